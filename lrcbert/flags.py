"""Flags both recipes share, declared once (each recipe adds its own in a subclass)."""

from __future__ import annotations

from dataclasses import dataclass

from lrcbert.config import flag
from lrcbert.errors import UserError
from lrcbert.method.losses import COS_NCE_FORMS, POOLING_MODES
from lrcbert.method.perturb import EPSILON_DEFAULT, PERTURB_MODES, PerturbConfig
from lrcbert.models import StudentShape


@dataclass(kw_only=True)
class StudentFlags:
    """The shape of a fresh student, and the optimizer's regularizers: every student run has them."""

    student_layers: int = flag("fresh student: layers", 4)
    student_hidden: int = flag("fresh student: hidden size", 312)
    student_intermediate: int = flag("fresh student: FFN size", 1200)
    student_heads: int = flag("fresh student: attention heads", 12)
    weight_decay: float = flag("AdamW weight decay (not on biases/LayerNorm)", 0.01)
    max_grad_norm: float = flag("gradient clipping (0 = off)", 1.0)

    @property
    def student_shape(self) -> StudentShape:
        return StudentShape(self.student_layers, self.student_hidden, self.student_intermediate, self.student_heads)


@dataclass(kw_only=True)
class GlueStudentFlags:
    """A student trained on one GLUE task: the data, its size, and the optimizer's rate
    (finetune/glue.py and the external baselines in bench/ declare them once, here)."""

    task: str = flag("GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli")
    data_dir: str | None = flag("GLUE task folder with the original train/dev/test TSV files; "
                                "without it the task comes from the hub via datasets", None)
    student: str | None = flag("student HF dir (e.g. a general-distilled student); "
                               "default: a fresh student of --student_* shape with the teacher's vocabulary", None)
    max_seq_length: int = flag("tokens per example, special tokens included", 128)
    max_train_samples: int = flag("use the first N training examples (-1: all)", -1)
    max_eval_samples: int = flag("use the first N examples of each dev split (-1: all)", -1)
    eval_batch_size: int = flag("examples per rank per evaluation batch", 64)
    learning_rate: float = flag("peak learning rate (paper sweeps 5e-5, 1e-4, 3e-4)", 1e-4)
    warmup: float = flag("warm-up: a fraction of the steps if < 1, else a step count", 0.1)
    temperature: float = flag("soft-loss temperature t", 1.1)


# the perturbation's knobs: they matter only with --perturb true, and a resume must keep them
PERTURB_KNOBS = ("epsilon", "epsilon_relative", "perturb_mode")
PERTURBATION_FLAGS = ("perturb", *PERTURB_KNOBS)


@dataclass(kw_only=True)
class SharedFlags(StudentFlags):
    """Engine, objective, student-shape and run-control flags of finetune/glue.py and pretrain/general_distill.py."""

    # the engine
    ds_config: str = flag("DeepSpeed config (ZeRO knobs; batch, clipping and precision are 'auto')",
                          "ds_configs/z2.json")
    gradient_accumulation_steps: int = flag("micro-steps per optimizer step", 1)
    # the LRC-BERT objective
    pooling: str = flag("pooling of layer outputs for COS-NCE", "flatten", choices=POOLING_MODES)
    cos_nce_form: str = flag("paper: COS-NCE as the paper writes it (the pull weighs 3x the push); centered: the push "
                             "weighs as much as the pull, so mapping every input to one vector gains nothing (not "
                             "in the paper; docs/METHOD_NOTES.md)", "paper", choices=list(COS_NCE_FORMS))
    perturb: bool = flag("gradient perturbation on the student's embedding output", True)
    epsilon: float = flag("perturbation radius: a share of each sample's embedding norm over its real tokens "
                          "(with --epsilon_relative false: the L2 norm of the shift over (T, D))", EPSILON_DEFAULT)
    epsilon_relative: bool = flag("--epsilon is relative to the sample's embedding norm", True)
    perturb_mode: str = flag("replace: train on L(e') only (paper); add: L(e) + L(e')", "replace",
                             choices=PERTURB_MODES)
    layer_map: str = flag("teacher layer per student layer, e.g. 3,6,9,12; auto = floor(i*N/M)", "auto")
    # run control
    stop_after_steps: int = flag("checkpoint and stop after this many steps without changing the schedule "
                                 "(resume later with --resume)", -1)
    keep_checkpoints: int = flag("checkpoints kept (oldest deleted first)", 2)
    log_steps: int = flag("TensorBoard scalars every N steps", 10)
    overwrite_output_dir: bool = flag("allow an output dir that already holds a run", False)
    seed: int = flag("random seed (data order, initialization, dropout, negatives)", 42)
    dist_timeout: float = flag("seconds a collective may wait before the run fails", 1800.0)
    dry_run: bool = flag("check everything, print the plan (batch math, steps, layer map, ds_config, memory per "
                         "rank for each ZeRO stage) and exit before starting anything", False)
    world_size: int = flag("with --dry_run: plan for this many ranks (0: the launcher's world size)", 0)

    def __post_init__(self):
        self.perturbation  # refuses a bad --epsilon or --perturb_mode  # noqa: B018
        if self.world_size < 0 or (self.world_size and not self.dry_run):
            raise UserError("--world_size plans a run with --dry_run; a real run takes its world size from the "
                            f"launcher (got --world_size {self.world_size})")

    def planned_world_size(self, launched: int) -> int:
        """The world size to plan for: --world_size in a dry run, else the launcher's."""
        return self.world_size if self.dry_run and self.world_size > 0 else launched

    @property
    def perturbation(self) -> PerturbConfig:
        return PerturbConfig(self.perturb, self.epsilon, self.perturb_mode, self.epsilon_relative)
