"""The LRC-BERT objective and its loss step, shared by general and task distillation.

Pure torch. ``LRCObjective(...)(...)`` is the loss of one student pass:

    L_total = alpha * sum_layers COS-NCE + beta * soft + gamma * hard

``LRCObjective.step`` is one micro-batch's loss step, the same in both recipes: the clean
student pass, gradient perturbation, the perturbed pass (METHOD.md, "Gradient
perturbation"), all scored against one teacher forward and one draw of negatives. The
recipes own the loop around it (batches, backward, optimizer step, logging).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lrcbert.method import losses
from lrcbert.method.negatives import Negatives, batch_negatives
from lrcbert.method.perturb import PerturbConfig, perturbed_loss

INTERMEDIATE_LOSSES = ("cos_nce", "mse", "none")

# forward(input_ids, attention_mask, token_type_ids, embedding_delta)
#   -> (logits or None, hidden states, embedding output, projected mapped layers)
StudentForward = Callable[..., tuple]


@dataclass(frozen=True)
class ObjectiveConfig:
    pooling: str = "flatten"
    intermediate: str = "cos_nce"  # cos_nce | mse (TinyBERT-style ablation) | none
    num_negatives: int = 15
    temperature: float = 1.1
    regression: bool = False
    cos_nce_form: str = "paper"  # paper | centered (losses.cos_nce)


@dataclass
class TeacherOutputs:
    """One frozen-teacher forward: logits (None for an encoder), hidden states (N + 1 of
    (B, T, d')), and the pooled vectors of the mapped layers ((B, F) fp32 each) when COS-NCE
    needs them (positives, batch negatives, the memory bank)."""

    logits: torch.Tensor | None
    hidden: tuple[torch.Tensor, ...]
    vectors: list[torch.Tensor] | None


class LRCObjective:
    """The loss of one student pass and the loss step of one micro-batch."""

    def __init__(self, layer_map: list[tuple[int, int]], config: ObjectiveConfig):
        if config.intermediate not in INTERMEDIATE_LOSSES:
            raise ValueError(f"intermediate loss must be one of {INTERMEDIATE_LOSSES}")
        self.layer_map = layer_map
        self.config = config

    @property
    def uses_cos_nce(self) -> bool:
        return self.config.intermediate == "cos_nce" and bool(self.layer_map)

    # ------------------------------------------------------------------ teacher and negatives

    def teacher_vectors(self, teacher_hidden, attention_mask) -> list[torch.Tensor]:
        """Pooled teacher vectors of the mapped layers, (B, F) fp32 each (no grad)."""
        with torch.no_grad():
            return [losses.pool(teacher_hidden[t], attention_mask, self.config.pooling) for _, t in self.layer_map]

    @torch.no_grad()
    def teacher(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TeacherOutputs:
        """The frozen teacher's forward (under no_grad) and, for COS-NCE, its pooled vectors."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"), output_hidden_states=True, return_dict=True)
        vectors = self.teacher_vectors(out.hidden_states, batch["attention_mask"]) if self.uses_cos_nce else None
        return TeacherOutputs(getattr(out, "logits", None), out.hidden_states, vectors)

    def batch_negatives(self, teacher_vectors: list[torch.Tensor], generator: torch.Generator) -> Negatives:
        """K negatives per row from the other rows of the global batch (see ``negatives.batch_negatives``)."""
        return batch_negatives(teacher_vectors, self.config.num_negatives, generator)

    # ------------------------------------------------------------------ the loss of one pass

    def __call__(
        self,
        weights: losses.LossWeights,
        attention_mask: torch.Tensor,
        projected: list[torch.Tensor],
        teacher_hidden,
        teacher_vectors: list[torch.Tensor] | None = None,
        negatives: Negatives | None = None,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, named unweighted parts): ``cos`` or ``mse`` with ``<name>_layer<i>``
        per mapped student layer, ``soft``, ``hard``, ``total``."""
        parts: dict[str, torch.Tensor] = {}
        cfg = self.config
        if cfg.intermediate != "none" and weights.alpha > 0 and self.layer_map:
            name = "cos" if cfg.intermediate == "cos_nce" else "mse"
            per_layer = self._intermediate(attention_mask, projected, teacher_hidden, teacher_vectors, negatives)
            for (s, _), value in zip(self.layer_map, per_layer):
                parts[f"{name}_layer{s}"] = value
            parts[name] = torch.stack(per_layer).sum()
        if student_logits is not None and teacher_logits is not None:
            parts["soft"] = losses.soft_loss(student_logits, teacher_logits, cfg.temperature, cfg.regression)
        if student_logits is not None and labels is not None:
            parts["hard"] = losses.hard_loss(student_logits, labels, cfg.regression)
        return losses.combine(parts, weights)

    def _intermediate(self, attention_mask, projected, teacher_hidden, teacher_vectors, negatives):
        """Per mapped layer: COS-NCE (or MSE) between projected student and teacher states."""
        cfg = self.config
        if cfg.intermediate == "mse":
            return [losses.hidden_mse(p, teacher_hidden[t], attention_mask)
                    for p, (_, t) in zip(projected, self.layer_map)]
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
                out.append(losses.cos_nce(pos, neg_sums[i], k, valid, cfg.cos_nce_form))
        return out

    # ------------------------------------------------------------------ the loss step

    def step(
        self,
        student: StudentForward,
        batch: dict[str, torch.Tensor],
        teacher: TeacherOutputs,
        weights: losses.LossWeights,
        negatives: Negatives | None = None,
        *,
        perturb: PerturbConfig = PerturbConfig(enabled=False),
        probe: StudentForward | None = None,
        loss_scale: float = 1.0,
        params: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch: the loss to backpropagate and its named parts for logging.

        Args:
            student: the training forward (DeepSpeed's engine): the pass whose loss is
                backpropagated runs through it.
            batch: ``input_ids``, ``attention_mask``, ``token_type_ids`` and, for the task
                stage, ``labels`` (B, ...).
            teacher: from :meth:`teacher`, computed once for both passes.
            weights: alpha, beta, gamma for this step.
            negatives: one draw (``batch_negatives`` or ``MemoryBank.draw``), scoring both
                passes; None when COS-NCE is off or weighted 0.
            perturb: gradient perturbation; when enabled the clean pass runs on ``probe``
                (the bare module: it only feeds dL/de) and the perturbed pass on ``student``.
            loss_scale: the fp16 loss scale, so the direction's gradient does not underflow.
            params: the trained parameters as whole tensors (ZeRO 0-2), so that add-mode
                perturbation takes two backward passes, not three (``perturbed_loss``).
        """
        mask = batch["attention_mask"]
        last_hidden = {}

        def loss_of(forward: StudentForward = student, delta: torch.Tensor | None = None):
            s_logits, hidden, embeddings, projected = forward(batch["input_ids"], mask, batch.get("token_type_ids"),
                                                              delta)
            last_hidden["student"] = hidden[-1]
            total, logs = self(weights, mask, projected, teacher.hidden, teacher.vectors, negatives,
                               s_logits, teacher.logits, batch.get("labels"))
            return total, logs, embeddings

        if perturb.enabled:
            loss, logs = perturbed_loss(loss_of, student, probe if probe is not None else student, perturb.epsilon,
                                        loss_scale, perturb.mode, attention_mask=mask, relative=perturb.relative,
                                        params=params)
        else:
            loss, logs = loss_of()[:2]
        # collapse watch: every sentence mapped to one direction shows as a cosine near 1
        logs["repr/student_cosine"] = losses.mean_pairwise_cosine(last_hidden["student"].detach(), mask)
        logs["repr/teacher_cosine"] = losses.mean_pairwise_cosine(teacher.hidden[-1], mask)
        return loss, logs
