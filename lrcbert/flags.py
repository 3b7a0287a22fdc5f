"""Flags both recipes share, declared once (each recipe adds its own in a subclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lrcbert.losses import POOLING_MODES
from lrcbert.perturb import PERTURB_MODES


@dataclass(kw_only=True)
class SharedFlags:
    """Engine, objective, student-shape and run-control flags of finetune/glue.py and pretrain/general_distill.py."""

    # the engine
    ds_config: str = field(default="ds_configs/z2.json", metadata={"help": "DeepSpeed config (ZeRO knobs; batch, clipping and precision are 'auto')"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases/LayerNorm)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    # the LRC-BERT objective
    pooling: str = field(default="flatten", metadata={"help": "pooling of layer outputs for COS-NCE", "choices": list(POOLING_MODES)})
    perturb: bool = field(default=True, metadata={"help": "gradient perturbation on the student's embedding output"})
    epsilon: float = field(default=1.0, metadata={"help": "perturbation radius: L2 norm of the shift per sample over (T, D)"})
    perturb_mode: str = field(default="replace", metadata={"help": "replace: train on L(e') only (paper); add: L(e) + L(e')", "choices": list(PERTURB_MODES)})
    layer_map: str = field(default="auto", metadata={"help": "teacher layer per student layer, e.g. 3,6,9,12; auto = floor(i*N/M)"})
    # a fresh student
    student_layers: int = field(default=4, metadata={"help": "fresh student: layers"})
    student_hidden: int = field(default=312, metadata={"help": "fresh student: hidden size"})
    student_intermediate: int = field(default=1200, metadata={"help": "fresh student: FFN size"})
    student_heads: int = field(default=12, metadata={"help": "fresh student: attention heads"})
    # run control
    stop_after_steps: int = field(default=-1, metadata={"help": "checkpoint and stop after this many steps without changing the schedule (resume later with --resume)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (oldest deleted first)"})
    log_steps: int = field(default=10, metadata={"help": "TensorBoard scalars every N steps"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "allow an output dir that already holds a run"})
    seed: int = field(default=42, metadata={"help": "random seed (data order, initialization, dropout, negatives)"})
    dist_timeout: float = field(default=1800.0, metadata={"help": "seconds a collective may wait before the run fails"})
