"""Gradient perturbation on the student's embedding output (METHOD.md, steps 1-4).

1. forward the student on its embedding output e and compute L(e);
2. g = dL/de (only w.r.t. e: no parameter gradient is produced);
3. e' = e + epsilon * g / ||g||_2, the norm taken per sample over (T, D);
4. forward again from e' and train on L(e') (or L(e) + L(e') with ``mode="add"``).

Step 2 uses ``torch.autograd.grad(..., inputs=e)``, which runs only the part of the
graph between the loss and e: parameter ``.grad`` fields and ZeRO's gradient hooks
are left untouched, so the optimizer sees the perturbed pass only.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

PERTURB_MODES = ("replace", "add")


def perturbation_delta(loss: torch.Tensor, embeddings: torch.Tensor, epsilon: float,
                       grad_scale: float = 1.0, retain_graph: bool = False) -> torch.Tensor | None:
    """epsilon * g / ||g|| with g = dL/de, per sample; None if g is not finite.

    Args:
        loss: scalar loss of the clean pass.
        embeddings: (B, T, D) embedding output the loss was computed from.
        epsilon: perturbation radius.
        grad_scale: multiplies the loss before differentiating (the fp16 loss scale, so
            small gradients do not underflow in half precision); the direction is unchanged.
        retain_graph: keep the clean graph (needed when the clean loss is also trained on).

    Returns:
        (B, T, D) detached delta in the embeddings' dtype, or None when the gradient
        overflowed (the caller then trains on the clean pass and logs the skip).
    """
    (grad,) = torch.autograd.grad(loss * grad_scale, embeddings, retain_graph=retain_graph)
    grad = grad.to(torch.float32)  # direction maths in fp32: fp16 norms overflow
    if not torch.isfinite(grad).all():
        return None
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
    delta = epsilon * grad / norm.view(-1, *([1] * (grad.dim() - 1)))
    return delta.to(embeddings.dtype).detach()


class EmbeddingTap:
    """Captures a model's embedding output and optionally adds a delta to it.

    Installed as a forward hook on ``model.base_model.embeddings`` (any Hugging Face
    BERT-style encoder). ``captured`` holds the (B, T, D) output of the last forward,
    including the delta, so the loss can be differentiated w.r.t. it.
    """

    def __init__(self, embeddings: nn.Module):
        self.delta: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self._handle = embeddings.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.delta is not None:
            output = output + self.delta
        self.captured = output
        return output

    @contextmanager
    def perturbed(self, delta: torch.Tensor | None):
        """Within the block, the embedding output is shifted by ``delta``."""
        self.delta = delta
        try:
            yield
        finally:
            self.delta = None

    def remove(self):
        self._handle.remove()
