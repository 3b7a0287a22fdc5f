"""Gradient perturbation on the student's embedding output (METHOD.md, steps 1-4).

1. forward the student on its embedding output e and compute L(e);
2. g = dL/de (only w.r.t. e: no parameter gradient is produced);
3. e' = e + r * g / ||g||_2, the norm taken per sample over (T, D) of the real tokens, with
   radius r = epsilon * ||e|| (relative, the default: the same share of every input whatever
   its length, padding or LayerNorm gain) or r = epsilon (absolute);
4. forward again from e' and train on L(e') (or L(e) + L(e') with ``mode="add"``). The
   perturbed pass reuses the clean pass's dropout masks (the RNG state is rewound), so the
   two passes differ by the shift alone.

Step 2 uses ``torch.autograd.grad(..., inputs=e)``, which runs only the part of the
graph between the loss and e: parameter ``.grad`` fields and ZeRO's gradient hooks
are left untouched, so the optimizer sees the perturbed pass only. In add mode, given the
parameters, step 2 takes the clean pass's parameter gradients in the same call (still
without touching ``.grad``), and the returned loss hands them to the engine's backward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lrcbert.errors import UserError

PERTURB_MODES = ("replace", "add")
EPSILON_DEFAULT = 0.01  # relative radius; docs/METHOD_NOTES.md ("Gradient perturbation") has the measurement


@dataclass(frozen=True)
class PerturbConfig:
    """Gradient perturbation settings (``--perturb``, ``--epsilon``, ``--perturb_mode``)."""

    enabled: bool = True
    epsilon: float = EPSILON_DEFAULT  # radius: a share of the sample's embedding norm (relative) or an L2 norm
    mode: str = "replace"  # replace: train on L(e') only (paper); add: L(e) + L(e')
    relative: bool = True

    def __post_init__(self):
        if self.mode not in PERTURB_MODES:
            raise UserError(f"--perturb_mode must be one of {', '.join(PERTURB_MODES)}, got {self.mode!r}")
        if self.enabled and not self.epsilon > 0:
            raise UserError(f"--epsilon must be positive, got {self.epsilon}")

    @property
    def student_passes(self) -> int:
        """Student forward passes per micro-batch: the clean one, plus the perturbed one in add mode."""
        return 2 if self.enabled and self.mode == "add" else 1


def perturbation_delta(loss: torch.Tensor, embeddings: torch.Tensor, epsilon: float,
                       grad_scale: float = 1.0, retain_graph: bool = False,
                       attention_mask: torch.Tensor | None = None, relative: bool = False) -> torch.Tensor | None:
    """epsilon * g / ||g|| with g = dL/de, per sample; None if g is not finite.

    Args:
        loss: scalar loss of the clean pass.
        embeddings: (B, T, D) embedding output the loss was computed from.
        epsilon: perturbation radius; with ``relative`` a fraction of each sample's embedding
            norm over its real tokens (the shift is then the same share of the input for any
            sentence length, padding and LayerNorm gain), otherwise an absolute L2 norm.
        grad_scale: multiplies the loss before differentiating (the fp16 loss scale, so
            small gradients do not underflow in half precision); the direction is unchanged.
        retain_graph: keep the clean graph (needed when the clean loss is also trained on).
        attention_mask: (B, T); padding positions get no shift.

    Returns:
        (B, T, D) detached delta in the embeddings' dtype, or None when the gradient
        overflowed (the caller then trains on the clean pass and logs the skip).
    """
    (grad,) = torch.autograd.grad(loss * grad_scale, embeddings, retain_graph=retain_graph)
    return shift_along(grad, embeddings, epsilon, attention_mask, relative)


def shift_along(grad: torch.Tensor, embeddings: torch.Tensor, epsilon: float,
                attention_mask: torch.Tensor | None = None, relative: bool = False) -> torch.Tensor | None:
    """The shift of :func:`perturbation_delta` from a gradient already taken (any positive
    scale of dL/de: only its direction is used)."""
    grad = grad.to(torch.float32)  # direction maths in fp32: fp16 norms overflow
    if not torch.isfinite(grad).all():
        return None
    shape = (-1, *([1] * (grad.dim() - 1)))
    if attention_mask is not None:
        real = attention_mask.to(torch.float32).reshape(*attention_mask.shape, *([1] * (grad.dim() - 2)))
        grad = grad * real
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
    radius = torch.full_like(norm, epsilon)
    if relative:
        e = embeddings.detach().to(torch.float32)
        if attention_mask is not None:
            e = e * real
        radius = epsilon * e.flatten(1).norm(dim=1)
    delta = (radius / norm).view(shape) * grad
    return delta.to(embeddings.dtype).detach()


class EmbeddingTap:
    """Captures the embedding output e as the encoder receives it, optionally shifted by a delta.

    A forward pre-hook on ``model.base_model.encoder`` (any Hugging Face BERT-style model):
    its first input is the embedding output. Tapping the encoder's input rather than the
    embeddings' output matters under ZeRO-3, whose hooks re-wrap tensors between modules:
    the tensor the encoder consumes is the one the loss can be differentiated against.
    ``captured`` holds the (B, T, D) tensor of the last forward, delta included.
    """

    def __init__(self, encoder: nn.Module):
        self.delta: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self._encoder = encoder
        self._handle = None

    def install(self) -> None:
        """(Re-)register the hook as the encoder's last pre-hook. Called at every forward:
        ZeRO-3 adds pre-hooks of its own (some during the first forward) that re-wrap the
        encoder's input, and ours must see the tensor the encoder will really use."""
        self.remove()
        self._handle = self._encoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        if self.delta is not None:
            hidden = hidden + self.delta
        self.captured = hidden
        return (hidden, *args), kwargs

    @contextmanager
    def perturbed(self, delta: torch.Tensor | None):
        """Within the block, the embedding output is shifted by ``delta``."""
        self.delta = delta
        try:
            yield
        finally:
            self.delta = None

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _Carry(torch.autograd.Function):
    """Worth 0; its backward hands each parameter a gradient computed earlier (scaled by the
    incoming gradient, i.e. by the loss scale and accumulation factor the engine applies)."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, upstream):
        scale = float(upstream)  # 1 in fp32 without accumulation: the gradients pass as they are
        return (None, *((g if scale == 1.0 else g * scale).to(g_dtype) for g, g_dtype in ctx.grads))


def carry_gradients(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """A scalar 0 whose gradient w.r.t. ``params[i]`` is ``grads[i]`` (fp32): added to a loss,
    the next backward (the engine's, with its loss scaling, ZeRO hooks and overflow check)
    accumulates gradients taken in an earlier, separate backward."""
    return _Carry.apply([(g, p.dtype) for p, g in zip(params, grads)], *params)


def _rng_state() -> tuple:
    """The generators dropout draws from: the CPU one and, on a GPU, the current device's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def perturbed_loss(loss_of, engine_forward, bare_forward, epsilon: float, loss_scale: float = 1.0,
                   mode: str = "replace", *, attention_mask: torch.Tensor | None = None, relative: bool = False,
                   same_dropout: bool = True, params: list[torch.Tensor] | None = None):
    """Steps 1-4 for one micro-batch; returns (loss to backpropagate, named parts for logging).

    Args:
        loss_of: ``loss_of(forward, delta) -> (loss, logs, embeddings)`` runs the student with
            ``forward`` on the embedding output shifted by ``delta`` (None: unshifted).
        engine_forward: the training wrapper's forward (DeepSpeed's engine): the pass whose
            loss is backpropagated must run through it.
        bare_forward: the wrapped module itself. The clean pass only feeds dL/de, so it runs
            here: DeepSpeed hooks the wrapper's outputs and would run its gradient-reduction
            epilogue on that pass (ZeRO-3 still gathers parameters via per-submodule hooks).
        epsilon, loss_scale, mode, attention_mask, relative: as in :func:`perturbation_delta`
            and ``PERTURB_MODES``.
        same_dropout: rewind the RNG before the second pass, so it draws the clean pass's
            dropout masks and the two passes differ by the shift alone.
        params: in add mode, the trained parameters as whole tensors (not ZeRO-3's
            partitions). One backward of the clean loss then gives dL/de and the clean
            pass's parameter gradients together, and the returned loss carries the latter
            (:func:`carry_gradients`): two backward passes a step, as in replace mode. Without
            it the clean graph is kept and backpropagated again with the perturbed loss
            (a third backward; the same gradients up to float rounding).

    Logs hold the trained pass's parts, the clean pass's under ``clean/``, and
    ``perturb_skipped`` (1 when a non-finite direction fell back to an unperturbed pass), so
    every rank logs the same names.
    """
    keep_clean = mode == "add"
    carry = keep_clean and params is not None
    masks = _rng_state() if same_dropout else None
    clean, clean_logs, embeddings = loss_of(bare_forward, None)
    if carry:  # one backward: dL/de and the clean parameter gradients (fp32, unscaled)
        trained = [p for p in params if p.requires_grad]
        grads = torch.autograd.grad(clean * loss_scale, [embeddings, *trained], allow_unused=True)
        delta = shift_along(grads[0], embeddings, epsilon, attention_mask, relative)
        pairs = [(p, g.to(torch.float32) / loss_scale) for p, g in zip(trained, grads[1:]) if g is not None]
    else:
        delta = perturbation_delta(clean, embeddings, epsilon, loss_scale, retain_graph=keep_clean,
                                   attention_mask=attention_mask, relative=relative)
    clean_named = {f"clean/{k}": v for k, v in clean_logs.items()}
    if masks is not None:
        _set_rng_state(masks)
    if delta is None:
        # the clean graph was freed by autograd.grad: run the unperturbed pass again through
        # the wrapper (every rank runs one more pass either way, so collectives stay matched)
        loss, logs, _ = loss_of(engine_forward, None)
        return loss, {**logs, **clean_named, "perturb_skipped": torch.tensor(1.0)}
    perturbed, logs, _ = loss_of(engine_forward, delta)
    logs = {**logs, **clean_named, "perturb_skipped": torch.tensor(0.0)}
    if carry:  # the clean graph is freed: its gradients ride on the perturbed loss
        carried = carry_gradients([p for p, _ in pairs], [g for _, g in pairs]) if pairs else 0.0
        return perturbed + clean.detach() + carried, logs
    return (clean + perturbed if keep_clean else perturbed), logs
