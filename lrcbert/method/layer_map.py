"""Which teacher layer each student layer learns from, and the projections W_i."""

from __future__ import annotations

import torch
from torch import nn

from lrcbert.errors import UserError


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """phi(i) = floor(i * N / M) for i = 1..M (1-based hidden_states indices).

    4 of 12 -> teacher 3, 6, 9, 12. When M does not divide N (4 of 6 -> 1, 3, 4, 6) the
    floor is our choice (the paper only uses N = 12, M = 4); the last student layer
    always maps to the last teacher layer. Impossible when M > N: two student layers
    would share a teacher layer and the first would map to the embeddings.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise UserError(f"layer map needs at least one layer each (student {student_layers}, teacher {teacher_layers})")
    if student_layers > teacher_layers:
        raise UserError(
            f"cannot map a {student_layers}-layer student onto a {teacher_layers}-layer teacher: "
            "the student must not be deeper than the teacher (or pass --layer_map explicitly)"
        )
    return [(i, (i * teacher_layers) // student_layers) for i in range(1, student_layers + 1)]


def parse_layer_map(spec: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """``"3,6,9,12"`` (teacher layer per student layer 1..M) or ``"auto"`` -> pairs."""
    if spec in ("", "auto"):
        return uniform_layer_map(student_layers, teacher_layers)
    try:
        targets = [int(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"--layer_map must be 'auto' or comma-separated teacher layers, got {spec!r}") from None
    if len(targets) != student_layers:
        raise UserError(f"--layer_map lists {len(targets)} teacher layers but the student has {student_layers} layers")
    for t in targets:
        if not 1 <= t <= teacher_layers:
            raise UserError(f"--layer_map teacher layer {t} is outside 1..{teacher_layers}")
    return list(zip(range(1, student_layers + 1), targets))


def format_layer_map(pairs: list[tuple[int, int]], student_width: int, teacher_width: int) -> str:
    """The start-up table: one row per mapped layer with its projection shape."""
    rows = [f"{'student layer':>13} | {'teacher layer':>13} | projection W_i", "-" * 50]
    rows += [f"{s:>13} | {t:>13} | {student_width} x {teacher_width}" for s, t in pairs]
    return "\n".join(rows)


class Projections(nn.Module):
    """One learned W_i (d -> d') per mapped layer; training-only, never exported."""

    def __init__(self, num_layers: int, student_width: int, teacher_width: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in range(num_layers))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=student_width**-0.5)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d') for mapped layer ``index`` (0-based in the map)."""
        return self.layers[index](hidden)
