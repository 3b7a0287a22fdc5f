"""Teacher and student models, built in one place: Hugging Face checkpoints in and out.

Configs and their checks (``load_config``, ``student_config_for``, ``check_positions``,
``check_teacher_labels``) run in a recipe's ``setup``, before any process group; the models
(``load_teacher``, ``build_student``, ``DistillStudent``) in its ``train``; ``export_hf`` writes
the trained student.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, PretrainedConfig

from lrcbert.errors import UserError
from lrcbert.method.layer_map import Projections
from lrcbert.method.perturb import EmbeddingTap


@dataclass
class StudentShape:
    """Student architecture (paper: 4 layers, 312 hidden, 1200 FFN, 12 heads, ~14.5M params)."""

    num_layers: int = 4
    hidden_size: int = 312
    intermediate_size: int = 1200
    num_heads: int = 12


def load_config(path: str, role: str) -> PretrainedConfig:
    """The model config at ``path`` (local dir or hub name), or a one-line UserError."""
    if os.path.sep in path or path.startswith("."):
        if not os.path.isdir(path):
            raise UserError(f"{role} directory not found: {path}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{role} directory {path} has no config.json (not a Hugging Face model dir)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # hub/network errors come in many types
        raise UserError(f"cannot load the {role} config from {path!r}: {str(exc).splitlines()[0]}") from None
    for attr in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if not hasattr(config, attr):
            raise UserError(f"{role} {path!r} is not a BERT-style encoder (its config has no {attr})")
    check_encoder(config, path, role)
    return config


def student_config(teacher_config: PretrainedConfig, shape: StudentShape) -> PretrainedConfig:
    """The teacher's config (vocabulary, positions, activation) at the student's size."""
    if shape.hidden_size % shape.num_heads:
        raise UserError(f"student hidden size {shape.hidden_size} is not divisible by {shape.num_heads} heads")
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = shape.num_layers
    config.hidden_size = shape.hidden_size
    config.intermediate_size = shape.intermediate_size
    config.num_attention_heads = shape.num_heads
    for attr in ("_name_or_path", "architectures"):
        if hasattr(config, attr):
            setattr(config, attr, None if attr == "architectures" else "")
    return config


def freeze(model: nn.Module) -> nn.Module:
    """The teacher is frozen by construction: eval mode, no parameter needs a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def with_labels(config: PretrainedConfig, label_names: list[str] | None) -> PretrainedConfig:
    config = copy.deepcopy(config)
    if label_names is None:
        config.num_labels = 1
        config.problem_type = "regression"
    else:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
        config.problem_type = "single_label_classification"
    return config


def load_classifier(path: str, label_names: list[str] | None, init_head: bool = False) -> nn.Module:
    """A sequence classifier from ``path``; with ``init_head`` a new head for the task's labels."""
    if init_head:
        config = with_labels(AutoConfig.from_pretrained(path), label_names)
        return AutoModelForSequenceClassification.from_pretrained(path, config=config)
    return AutoModelForSequenceClassification.from_pretrained(path)


def load_teacher(path: str, *, task_head: bool, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen teacher: a fine-tuned task classifier (``task_head``) or a bare encoder."""
    model = AutoModelForSequenceClassification.from_pretrained(path) if task_head else AutoModel.from_pretrained(path)
    return freeze(model).to(device=device, dtype=dtype)


def build_student(config: PretrainedConfig, *, path: str | None = None, task_head: bool,
                  label_names: list[str] | None = None) -> nn.Module:
    """The model to train: from ``path`` (a general-distilled student; the teacher itself for
    teacher fine-tuning) or fresh from ``config``.

    ``task_head``: a sequence classifier with a new head for ``label_names`` (None: regression).
    Otherwise a bare encoder for general distillation, whose pooler is frozen: COS-NCE on the
    layer outputs gives it no gradient, and it stays out of ZeRO's buckets (the task stage trains it).
    """
    if task_head:
        if path:
            return load_classifier(path, label_names, init_head=True)
        return AutoModelForSequenceClassification.from_config(with_labels(config, label_names))
    model = AutoModel.from_pretrained(path) if path else AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler.requires_grad_(False)
    return model


def init_regression_head(model: nn.Module, label_value: float) -> None:
    """Start a new regression head's output bias at a typical training label (the recipe passes the median),
    so its first updates go into the correlation rather than into the offset."""
    head = getattr(model, "classifier", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if not linears or linears[-1].out_features != 1 or linears[-1].bias is None:
        raise UserError(f"{type(model).__name__} has no one-output linear regression head to initialize")
    with torch.no_grad():
        linears[-1].bias.fill_(label_value)


def student_config_for(student: str | None, teacher_config: PretrainedConfig, shape: StudentShape,
                       tokenizer) -> PretrainedConfig:
    """The student's config: a given student's, or a fresh one of ``shape`` with the teacher's
    vocabulary; either way its vocabulary must be the teacher's (the same tokens feed both)."""
    config = load_config(student, "student") if student else student_config(teacher_config, shape)
    if config.vocab_size != teacher_config.vocab_size or len(tokenizer) > config.vocab_size:
        raise UserError(f"student vocabulary ({config.vocab_size}) does not match the teacher's "
                        f"({teacher_config.vocab_size}, tokenizer {len(tokenizer)})")
    return config


def check_positions(max_seq_length: int, **configs: PretrainedConfig) -> None:
    """Every model must have position embeddings for ``max_seq_length`` tokens."""
    for role, config in configs.items():
        positions = getattr(config, "max_position_embeddings", max_seq_length)
        if max_seq_length > positions:
            raise UserError(f"--max_seq_length {max_seq_length} exceeds the {role}'s {positions} positions")


def check_encoder(config: PretrainedConfig, path: str, role: str) -> None:
    """Refuse anything but an encoder-only model with a BERT-style encoder stack (hidden states per layer)."""
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UserError(f"{role} {path} ({kind}) is not an encoder-only model; use a BERT-style encoder")
    try:
        with torch.device("meta"):  # the architecture only: no memory, no weights read
            model = AutoModel.from_config(copy.deepcopy(config))  # from_config writes into the config it gets
    except Exception as exc:  # unknown or broken model types fail in many ways
        raise UserError(f"{role} {path}: AutoModel cannot build a {kind} model ({str(exc).splitlines()[0]})") from None
    if getattr(model.base_model, "encoder", None) is None:
        raise UserError(f"{role} {path} ({type(model).__name__}) is not a BERT-style encoder: "
                        "it has no encoder stack whose hidden states COS-NCE could use")


def check_teacher_labels(task, config: PretrainedConfig, path: str) -> None:
    """The task teacher must predict this task's labels in this task's order."""
    wanted = 1 if task.is_regression else task.num_labels
    if config.num_labels != wanted:
        raise UserError(f"teacher {path} has {config.num_labels} labels but {task.name} needs {wanted}; "
                        "fine-tune a teacher for this task first (--stage teacher)")
    if task.is_regression:
        return
    names = [str(config.id2label[i]).lower() for i in range(config.num_labels)]
    if all(n.startswith("label_") for n in names):
        return  # generic names: the order cannot be checked
    if names != [n.lower() for n in task.label_names]:
        raise UserError(f"teacher {path} label order {names} differs from {task.name}'s "
                        f"{[n.lower() for n in task.label_names]}; its logits would be misread")


class DistillStudent(nn.Module):
    """What DeepSpeed trains: the student plus its training-only projections W_i.

    ``forward`` returns the logits (None for an encoder without a head), the hidden
    states (M + 1 tensors of (B, T, d)), the embedding output e (B, T, d) that gradient
    perturbation differentiates, and the projected mapped layers (B, T, d') in map
    order. Projections run inside this forward so ZeRO-3 gathers their partitions like
    any other weight. Only ``self.model`` is exported.
    """

    def __init__(self, model: nn.Module, mapped_layers: list[int], teacher_width: int):
        super().__init__()
        self.model = model
        self.mapped_layers = list(mapped_layers)
        self.projections = (Projections(len(mapped_layers), model.config.hidden_size, teacher_width)
                            if mapped_layers else None)
        self.tap = EmbeddingTap(model.base_model.encoder)

    def forward(self, input_ids, attention_mask, token_type_ids=None, embedding_delta=None):
        self.tap.install()
        with self.tap.perturbed(embedding_delta):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        projected = [self.projections(i, hidden[s]) for i, s in enumerate(self.mapped_layers)]
        return getattr(out, "logits", None), hidden, self.tap.captured, projected


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_hf(state_dict: dict, prefix: str, config: PretrainedConfig, tokenizer, out_dir: str,
              with_head: bool = True) -> None:
    """Write a Hugging Face model directory (weights under ``prefix`` only, plus tokenizer).

    Built in a temporary sibling directory and renamed into place, so an interrupted
    export never leaves a half-written model where a complete one was.
    """
    import shutil

    weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    factory = AutoModelForSequenceClassification if with_head else AutoModel
    model = factory.from_config(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"export: weights do not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
