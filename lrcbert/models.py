"""Teacher and student models: Hugging Face checkpoints in, Hugging Face checkpoints out."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer,
                          PretrainedConfig)

from lrcbert.errors import UserError
from lrcbert.layer_map import Projections
from lrcbert.perturb import EmbeddingTap


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
    return config


def load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"cannot load a tokenizer from {path!r}: {str(exc).splitlines()[0]}") from None


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


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: dict[str, torch.Tensor]):
    """(logits or None, hidden states) of the frozen teacher."""
    out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch.get("token_type_ids"), output_hidden_states=True, return_dict=True)
    return getattr(out, "logits", None), out.hidden_states


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
        raise RuntimeError(f"export: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
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
