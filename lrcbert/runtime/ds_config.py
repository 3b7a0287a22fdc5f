"""ds_config resolution: DeepSpeed knobs from the file, everything the trainer knows from its flags.

``ds_configs/*.json`` hold DeepSpeed knobs only (ZeRO stage, buckets, loss-scaler settings);
values the trainer also knows are ``"auto"`` there and filled from the trainer's flags. A
concrete value that disagrees with a flag is refused, naming both. No deepspeed import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from lrcbert.config import load_json_object
from lrcbert.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
# Sections the trainer owns: the optimizer and scheduler are built in Python so the same
# code runs on CPU (gloo) and GPU (NCCL) and their state is checkpointed by DeepSpeed.
TRAINER_OWNED_SECTIONS = ("optimizer", "scheduler")


@dataclass(frozen=True)
class TrainerSettings:
    """What the trainer knows and the ds_config must agree with."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    gradient_clipping: float
    precision: str

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def _fill(config: dict, key: str, value, flag: str, source: str) -> None:
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise UserError(f"{source}: {key} is {current} but {flag} gives {value}; set it to \"auto\" or change the flag")


def resolve_ds_config(path: str, settings: TrainerSettings) -> dict:
    """Load a ds_config, fill its ``"auto"`` values and check it against the trainer.

    Checks ``train_batch_size == micro batch x accumulation x world size`` and that the
    precision sections agree with ``--precision``. Raises UserError naming the problem.
    """
    raw = load_json_object(path, "ds_config")
    if settings.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    for section in TRAINER_OWNED_SECTIONS:
        if section in raw:
            raise UserError(f"{path}: remove the \"{section}\" section; the trainer builds the {section} "
                            f"from its flags (--learning_rate, --warmup, --weight_decay)")
    config = copy.deepcopy(raw)
    _fill(config, "train_micro_batch_size_per_gpu", settings.micro_batch_size, "--micro_batch_size", path)
    _fill(config, "gradient_accumulation_steps", settings.gradient_accumulation_steps,
          "--gradient_accumulation_steps", path)
    _fill(config, "gradient_clipping", settings.gradient_clipping, "--max_grad_norm", path)
    batch = config.get("train_batch_size", "auto")
    if batch == "auto":
        config["train_batch_size"] = settings.global_batch_size
    elif batch != settings.global_batch_size:
        raise UserError(
            f"{path}: train_batch_size is {batch} but micro batch {settings.micro_batch_size} x accumulation "
            f"{settings.gradient_accumulation_steps} x world size {settings.world_size} = {settings.global_batch_size}")
    for name in ("fp16", "bf16"):
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            raise UserError(f"{path}: \"{name}\" must be an object")
        wanted = settings.precision == name
        enabled = section.get("enabled", "auto")
        if enabled == "auto":
            section["enabled"] = wanted
        elif bool(enabled) != wanted:
            raise UserError(f"{path}: {name}.enabled is {str(enabled).lower()} but --precision is {settings.precision}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    unresolved = [k for k, v in _walk(config) if v == "auto"]
    if unresolved:
        raise UserError(f"{path}: the trainer cannot fill \"auto\" for {', '.join(unresolved)}")
    # our optimizer is a plain torch one: tell ZeRO that is intended
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 10**9)
    return config


def zero_stage(config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it has no zero_optimization section)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_perturbation_supported(config: dict, path: str) -> None:
    """Gradient perturbation needs dL/de, which ZeRO-3's module hooks hide from autograd in
    DeepSpeed 0.19: refuse the combination before any process starts."""
    if zero_stage(config) == 3:
        raise UserError(f"{path}: gradient perturbation needs dL/de, which ZeRO-3's module hooks hide "
                        "from autograd in this DeepSpeed version; use ZeRO-1/2 (ds_configs/z2.json) or --perturb false")


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node

