"""The LRC-BERT objective, shared by general and task distillation.

Pure torch: takes student and teacher outputs, returns the weighted loss and its named
parts. The recipes own the loop (forward, perturbation, backward, step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lrcbert import losses
from lrcbert.negatives import batch_negative_distance_sums, gather_teacher_vectors, sample_other_rows

INTERMEDIATE_LOSSES = ("cos_nce", "mse", "none")

# student vectors per layer -> (negative-distance sums per layer, K)
NegativeFn = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], int]]


@dataclass
class ObjectiveConfig:
    pooling: str = "flatten"
    intermediate: str = "cos_nce"
    num_negatives: int = 15
    temperature: float = 1.1
    regression: bool = False


class LRCObjective:
    """L_total = alpha * sum_layers COS-NCE + beta * soft + gamma * hard."""

    def __init__(self, layer_map: list[tuple[int, int]], config: ObjectiveConfig):
        if config.intermediate not in INTERMEDIATE_LOSSES:
            raise ValueError(f"intermediate loss must be one of {INTERMEDIATE_LOSSES}")
        self.layer_map = layer_map
        self.config = config

    def teacher_vectors(self, teacher_hidden, attention_mask) -> list[torch.Tensor]:
        """Pooled teacher vectors of the mapped layers, (B, F) fp32 each (no grad)."""
        with torch.no_grad():
            return [losses.pool(teacher_hidden[t], attention_mask, self.config.pooling) for _, t in self.layer_map]

    def batch_negatives(self, teacher_vectors: list[torch.Tensor], generator: torch.Generator) -> NegativeFn:
        """Negatives from the other rows of the global batch, sampled once per step.

        The same rows serve the clean and the perturbed pass. K is capped at
        global batch - 1.
        """
        pool, offset = gather_teacher_vectors(teacher_vectors)
        global_batch = pool[0].shape[0]
        k = min(self.config.num_negatives, global_batch - 1)
        if k < 1:
            return lambda student_vectors: ([torch.zeros(v.shape[0]) for v in student_vectors], 0)
        neg_index = sample_other_rows(teacher_vectors[0].shape[0], global_batch, offset, k, generator)
        return lambda student_vectors: (batch_negative_distance_sums(student_vectors, pool, neg_index), k)

    def __call__(
        self,
        weights: losses.LossWeights,
        attention_mask: torch.Tensor,
        projected: list[torch.Tensor],
        teacher_hidden,
        teacher_vectors: list[torch.Tensor] | None = None,
        negatives: NegativeFn | None = None,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        cfg = self.config
        if cfg.intermediate != "none" and weights.alpha > 0:
            per_layer = self._intermediate(attention_mask, projected, teacher_hidden, teacher_vectors, negatives)
            for (s, _), value in zip(self.layer_map, per_layer):
                parts[f"cos_layer{s}"] = value
            parts["cos"] = torch.stack(per_layer).sum()
        if student_logits is not None and teacher_logits is not None:
            parts["soft"] = losses.soft_loss(student_logits, teacher_logits, cfg.temperature, cfg.regression)
        if student_logits is not None and labels is not None:
            parts["hard"] = losses.hard_loss(student_logits, labels, cfg.regression)
        return losses.combine(parts, weights)

    def _intermediate(self, attention_mask, projected, teacher_hidden, teacher_vectors, negatives):
        """Per mapped layer: COS-NCE (or MSE) between projected student and teacher states."""
        cfg = self.config
        if cfg.intermediate == "mse":
            return [losses.hidden_mse(p, teacher_hidden[t], attention_mask) for p, (_, t) in zip(projected, self.layer_map)]
        if teacher_vectors is None:
            teacher_vectors = self.teacher_vectors(teacher_hidden, attention_mask)
        student_vectors = [losses.pool(p, attention_mask, cfg.pooling) for p in projected]
        valid = attention_mask.sum(1) > 0
        neg_sums, k = negatives(student_vectors) if negatives is not None else (None, 0)
        out = []
        for i, (z_s, z_t) in enumerate(zip(student_vectors, teacher_vectors)):
            pos = losses.angular_distance(z_t, z_s)
            if k == 0:  # no negative available (global batch of 1): pull term only
                out.append((pos * valid).sum() / valid.sum().clamp_min(1))
            else:
                out.append(losses.cos_nce(pos, neg_sums[i], k, valid))
        return out
