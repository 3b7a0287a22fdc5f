"""The two-stage loss schedule and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lrcbert.errors import UserError
from lrcbert.method.losses import LossWeights


def parse_weights(spec: str, flag: str) -> LossWeights:
    """``"1:1:3"`` -> LossWeights(1, 1, 3)."""
    try:
        a, b, c = (float(x) for x in spec.split(":"))
    except ValueError:
        raise UserError(f"{flag} must be alpha:beta:gamma, e.g. 1:1:3, got {spec!r}") from None
    if min(a, b, c) < 0:
        raise UserError(f"{flag} weights must be non-negative, got {spec!r}")
    return LossWeights(a, b, c)


def check_fraction(flag: str, value: float, meaning: str = "") -> None:
    """UserError unless ``value`` is a fraction in [0, 1] (``meaning`` says of what)."""
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{flag} must be in [0, 1]{f' ({meaning})' if meaning else ''}, got {value}")


@dataclass(frozen=True)
class TwoStageSchedule:
    """alpha:beta:gamma by optimizer step.

    Stage 1 covers the first ``stage1_fraction`` of ``total_steps`` (paper: 80% at 1:0:0),
    stage 2 the rest (paper: 1:1:3). ``stage1_fraction = 0`` gives one stage with the
    stage-2 weights throughout (the "no two-stage schedule" ablation).
    """

    total_steps: int
    stage1_fraction: float = 0.8
    stage1: LossWeights = LossWeights(1.0, 0.0, 0.0)
    stage2: LossWeights = LossWeights(1.0, 1.0, 3.0)
    prediction_ramp: float = 0.0

    def __post_init__(self):
        check_fraction("--stage1_fraction", self.stage1_fraction, "a fraction of the steps")
        check_fraction("--prediction_ramp", self.prediction_ramp, "a fraction of stage 2's steps")

    @classmethod
    def from_flags(cls, total_steps: int, flags) -> "TwoStageSchedule":
        """From ``--stage1_fraction``, ``--stage1_weights``, ``--stage2_weights`` and
        ``--prediction_ramp`` (UserError naming a bad one)."""
        return cls(total_steps, flags.stage1_fraction, parse_weights(flags.stage1_weights, "--stage1_weights"),
                   parse_weights(flags.stage2_weights, "--stage2_weights"), flags.prediction_ramp)

    @property
    def stage2_start(self) -> int:
        return int(round(self.total_steps * self.stage1_fraction))

    def stage(self, step: int) -> int:
        """1 or 2 for the 0-based optimizer step about to be taken."""
        return 1 if step < self.stage2_start else 2

    @property
    def ramp_steps(self) -> int:
        return int(round((self.total_steps - self.stage2_start) * self.prediction_ramp))

    def weights(self, step: int) -> LossWeights:
        if self.stage(step) == 1:
            return self.stage1
        into = step - self.stage2_start + 1  # 1 on stage 2's first step
        if into >= self.ramp_steps:
            return self.stage2
        f = into / self.ramp_steps
        return LossWeights(self.stage2.alpha, self.stage2.beta * f, self.stage2.gamma * f)


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(total_steps - warmup_steps, 1)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def warmup_steps_from(warmup: float, total_steps: int) -> int:
    """``--warmup`` below 1 is a fraction of the run, otherwise a step count."""
    return int(math.ceil(warmup * total_steps)) if warmup < 1 else int(warmup)


def two_stage_lr(warmup: float, total_steps: int, stage2_start: int):
    """LR multiplier with one warm-up + linear decay per loss stage.

    Stage 2 (``stage2_start`` .. ``total_steps``) is the only stage that trains the prediction
    layer; under one schedule for the whole run it would start at about a fifth of the peak and
    get a few percent of the run's learning rate. Here each stage warms up to the peak (``warmup``
    as a fraction of that stage's steps if < 1, else a step count) and decays to 0 at its end.
    With no stage 2 (``stage2_start`` 0 or ``total_steps``) this is :func:`warmup_linear_decay`.
    """
    if stage2_start <= 0 or stage2_start >= total_steps:
        return warmup_linear_decay(warmup_steps_from(warmup, total_steps), total_steps)
    first = warmup_linear_decay(warmup_steps_from(warmup, stage2_start), stage2_start)
    second_steps = total_steps - stage2_start
    second = warmup_linear_decay(warmup_steps_from(warmup, second_steps), second_steps)

    def factor(step: int) -> float:
        return first(step) if step < stage2_start else second(step - stage2_start)

    return factor
