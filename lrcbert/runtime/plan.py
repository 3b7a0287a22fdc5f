"""``--dry_run``: what a run would do and need, printed before anything starts.

Both recipes call :func:`describe` after their ``setup`` has checked every flag and file and
instead of starting the run: no process group, no model weights, no training data beyond
the row counts. ``--world_size N`` plans for a cluster from any machine.

The memory figures are an estimate per rank, for each ZeRO stage (the configured one marked):

* model states of what DeepSpeed trains (student, task head, projections), P parameters:
  fp32 runs hold 4P of weights, 4P of gradients and 8P of Adam moments; fp16/bf16 runs 2P,
  2P and 12P (moments plus the fp32 master copy). Stage 1 divides the optimizer states by
  the world size, stage 2 also the gradients, stage 3 also the weights;
* the frozen teacher, replicated: 4 bytes a parameter (2 in fp16/bf16);
* the memory bank's shard, exactly as ``MemoryBank.bytes_per_rank`` counts it;
* activations of one micro-batch: the student's layers kept for backward (per layer
  ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit, twice that in fp32: the usual transformer count
  without recomputation), the teacher's hidden states, the projected and pooled mapped layers,
  and the negatives' direction sums (global batch x dim per mapped layer); ``--perturb_mode add``
  counts two passes: what ZeRO-3 keeps, an upper bound under ZeRO 0-2, where the clean pass's
  graph is freed and its fp32 parameter gradients (4 bytes a parameter) are kept instead.

Parameters and optimizer states are counted exactly from the architecture (built on the meta
device) and match the tensors a real ZeRO run holds (tests/test_dry_run.py against
bench/results/memory.json). Activations are the part to read as an order of magnitude: on two
CPU ranks (bench/memory.py's run) the peak RSS grew by about twice the estimated total, the rest
being DeepSpeed's communication buckets, temporaries of the negatives' scoring and the allocator.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from lrcbert.runtime.ds_config import zero_stage as zero_stage_of

MIB = 2**20


@dataclass
class Plan:
    """What a dry run reports; ``memory`` is filled by :func:`estimate_memory`."""

    recipe: str
    world_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    total_steps: int
    max_seq_length: int
    precision: str
    zero_stage: int
    ds_config: dict
    layer_map_text: str
    data_text: str
    trained_parameters: int
    teacher_parameters: int
    bank_bytes_per_rank: int = 0
    memory: dict = field(default_factory=dict)

    @classmethod
    def for_run(cls, recipe: str, args, world_size: int, total_steps: int, ds_config: dict, **rest) -> "Plan":
        """A plan with the batch, length, precision and ZeRO stage the recipe's flags (``args``) set."""
        return cls(recipe=recipe, world_size=world_size, micro_batch_size=args.micro_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps, total_steps=total_steps,
                   max_seq_length=args.max_seq_length, precision=args.precision,
                   zero_stage=zero_stage_of(ds_config), ds_config=ds_config,
                   **rest)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def count_on_meta(config, with_head: bool) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (no memory)."""
    factory = AutoModelForSequenceClassification if with_head else AutoModel
    with torch.device("meta"):
        model = factory.from_config(copy.deepcopy(config))
    return sum(p.numel() for p in model.parameters())


def trained_parameters(student_cfg, with_head: bool, mapped_layers: int, teacher_width: int) -> int:
    """The student (with its task head) plus one d x d' projection, no bias, per mapped layer."""
    return count_on_meta(student_cfg, with_head) + mapped_layers * student_cfg.hidden_size * teacher_width


def model_state_bytes(parameters: int, precision: str, zero_stage: int, world_size: int) -> dict[str, int]:
    """Per rank: weights, gradients and optimizer states of ``parameters`` trained parameters."""
    half = precision in ("fp16", "bf16")
    weights, grads, optim = parameters * (2 if half else 4), parameters * (2 if half else 4), parameters * (
        12 if half else 8)
    return {"parameters": weights // (world_size if zero_stage >= 3 else 1),
            "gradients": grads // (world_size if zero_stage >= 2 else 1),
            "optimizer_states": optim // (world_size if zero_stage >= 1 else 1)}


def activation_bytes(student_cfg, teacher_cfg, micro_batch: int, seq: int, precision: str, mapped_layers: int,
                     negatives_dim: int, global_batch: int, passes: int = 1) -> int:
    """An estimate of one micro-batch's activations on a rank (see the module docstring)."""
    b, s = micro_batch, seq
    h, a = student_cfg.hidden_size, student_cfg.num_attention_heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * (1 if precision in ("fp16", "bf16") else 2)
    student = per_layer * student_cfg.num_hidden_layers + s * b * h * 4 * 2  # + embeddings and logits side
    if teacher_cfg is None:  # fine-tuning the teacher itself: no second model, no intermediate loss
        return int(student)
    width = teacher_cfg.hidden_size
    teacher = (teacher_cfg.num_hidden_layers + 1) * b * s * width * (2 if precision in ("fp16", "bf16") else 4)
    intermediate = mapped_layers * b * s * width * 4 * 3  # projected, normalized, pooled (fp32)
    negatives = mapped_layers * global_batch * negatives_dim * 4
    return int(passes * (student + intermediate) + teacher + negatives)


def estimate_memory(plan: Plan, activations: int) -> dict[int, dict[str, int]]:
    """Bytes per rank by component, for ZeRO stages 0 to 3."""
    teacher = plan.teacher_parameters * (2 if plan.precision in ("fp16", "bf16") else 4)
    out = {}
    for stage in range(4):
        parts = model_state_bytes(plan.trained_parameters, plan.precision, stage, plan.world_size)
        parts.update(teacher=teacher, bank=plan.bank_bytes_per_rank, activations=activations)
        parts["total"] = sum(parts.values())
        out[stage] = parts
    plan.memory = out
    return out


def describe(plan: Plan) -> str:
    """The dry run's report (printed by the recipes)."""
    lines = [f"dry run of {plan.recipe}: nothing was started (no process group, no weights, no training data)",
             "",
             f"batch: micro {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x world "
             f"{plan.world_size} = {plan.global_batch_size} sequences of {plan.max_seq_length} tokens per "
             "optimizer step",
             f"steps: {plan.total_steps:,} optimizer steps; {plan.data_text}",
             f"precision {plan.precision}, ZeRO stage {plan.zero_stage}; trained parameters "
             f"{plan.trained_parameters / 1e6:.2f}M (what DeepSpeed trains: the student and its projections), "
             f"frozen teacher {plan.teacher_parameters / 1e6:.2f}M",
             f"memory bank: {plan.bank_bytes_per_rank / MIB:,.1f} MiB per rank" if plan.bank_bytes_per_rank
             else "memory bank: none (batch negatives)", ""]
    if plan.layer_map_text:
        lines += [plan.layer_map_text, ""]
    components = ["parameters", "gradients", "optimizer_states", "teacher", "bank", "activations", "total"]
    header = " | ".join(f"ZeRO-{s}{' (configured)' if s == plan.zero_stage else ''}" for s in range(4))
    lines += [f"estimated memory per rank at world size {plan.world_size}, MiB (activations: an estimate):",
              f"| component | {header} |", "|---|" + "---:|" * 4]
    for name in components:
        lines.append(f"| {name.replace('_', ' ')} | " +
                     " | ".join(f"{plan.memory[s][name] / MIB:,.1f}" for s in range(4)) + " |")
    lines += ["", "resolved ds_config:", json.dumps(plan.ds_config, indent=2, sort_keys=True)]
    return "\n".join(lines)
