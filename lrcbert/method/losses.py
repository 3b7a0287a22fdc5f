"""LRC-BERT losses as pure functions of tensors.

Every function computes in fp32, whatever the input dtype (cosines of fp16 vectors
overflow: a flattened 128 x 768 hidden state has norms far beyond fp16's range).
Shapes: B = batch, T = sequence length, D = hidden width, F = pooled vector width,
K = negatives per sample, C = classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLING_MODES = ("flatten", "mean", "cls")
NORM_EPS = 1e-6


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "flatten") -> torch.Tensor:
    """Turn per-token states into one vector per sample, ignoring padding.

    Args:
        hidden: (B, T, D) layer output.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
        mode: ``flatten`` (the whole masked T x D matrix as one vector of F = T*D; padding
            rows are zero, so zero-padding to a longer T does not change any cosine),
            ``mean`` (masked mean over tokens, F = D) or ``cls`` (first token, F = D).

    Returns:
        (B, F) fp32. A sample whose mask is all zero gives the zero vector.
    """
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    h = hidden.to(torch.float32)
    if mode == "flatten":
        return (h * mask).flatten(1)
    if mode == "mean":
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if mode == "cls":
        return h[:, 0] * mask[:, 0]
    raise ValueError(f"unknown pooling mode {mode!r}; choose from {', '.join(POOLING_MODES)}")


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (..., F) tensors in fp32; a zero vector has cosine 0 with anything."""
    x = x.to(torch.float32)
    y = y.to(torch.float32)
    return (x * y).sum(-1) / (x.norm(dim=-1).clamp_min(NORM_EPS) * y.norm(dim=-1).clamp_min(NORM_EPS))


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g(x, y) = 1 - cos(x, y), row-wise over the last dim, in [0, 2]."""
    return 1.0 - cosine(x, y)


def pairwise_angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, F) x (P, F) -> (N, P) matrix of 1 - cos, in fp32 (normalized matmul)."""
    xn = x.to(torch.float32)
    yn = y.to(torch.float32)
    xn = xn / xn.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    yn = yn / yn.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return 1.0 - xn @ yn.T


COS_NCE_FORMS = ("paper", "centered")


def cos_nce(
    pos_distance: torch.Tensor,
    neg_distance_sum: torch.Tensor,
    num_negatives: int,
    valid: torch.Tensor | None = None,
    form: str = "paper",
) -> torch.Tensor:
    """COS-NCE for one mapped layer, averaged over valid samples.

    Per sample: ``L = g_pos + (2K - sum_k (g_neg_k - g_pos)) / (2K)`` with
    g_pos = g(z_T, z_S) and g_neg_k = g(n_k, z_S) (METHOD.md). Only the sum of the
    negative distances is needed, so negative sources (batch or memory bank) hand in
    ``neg_distance_sum``.

    In cosines the paper's form is ``2 - 1.5 cos(z_T, z_S) + 0.5 mean_k cos(n_k, z_S)``: the
    pull weighs three times the push, so a student that maps every input to the teacher's mean
    direction already pays less than a random one (docs/METHOD_NOTES.md, "What the collapse
    watch shows on CoLA"). ``form="centered"`` (not in the paper) keeps the pull and gives the
    push the same weight, ``L = 1 + 1.5 (g_pos - mean_k g_neg_k)``: a student that gives every
    input one vector then pays 1 in expectation wherever that vector points, and only telling
    inputs apart lowers the loss. Both stay linear in the negatives, so a source still hands
    in only their sum.

    Args:
        pos_distance: (B,) g(z_T, z_S).
        neg_distance_sum: (B,) sum over the K negatives of g(n_k, z_S).
        num_negatives: K >= 1.
        valid: optional (B,) bool; samples with an all-padding input are excluded.
        form: ``paper`` or ``centered`` (above).

    Returns:
        Scalar fp32 mean over valid samples; 0 (still differentiable) if none is valid.
    """
    if num_negatives < 1:
        raise ValueError("COS-NCE needs at least one negative")
    if form not in COS_NCE_FORMS:
        raise ValueError(f"COS-NCE form must be one of {COS_NCE_FORMS}, got {form!r}")
    k = float(num_negatives)
    pos = pos_distance.to(torch.float32)
    neg_sum = neg_distance_sum.to(torch.float32)
    if form == "paper":
        per_sample = pos + (2.0 * k - (neg_sum - k * pos)) / (2.0 * k)  # (B,)
    else:
        per_sample = 1.0 + 1.5 * (pos - neg_sum / k)
    if valid is None:
        return per_sample.mean()
    weights = valid.to(torch.float32)
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
              regression: bool = False) -> torch.Tensor:
    """Prediction-layer distillation loss.

    Classification: ``t^2 * KL(softmax(y_T / t) || softmax(y_S / t))``, mean over the batch.
    Regression (STS-B): MSE between student and teacher predictions.
    Shapes: (B, C) logits, or (B,) / (B, 1) for regression. Returns a fp32 scalar; 0 for B = 0.
    """
    s = student_logits.to(torch.float32)
    t = teacher_logits.to(torch.float32)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    if regression:
        return F.mse_loss(s.reshape(-1), t.reshape(-1))
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor, regression: bool = False) -> torch.Tensor:
    """Cross-entropy with gold labels (B,), or MSE for regression. fp32 scalar; 0 for B = 0."""
    s = student_logits.to(torch.float32)
    if s.shape[0] == 0:
        return s.sum() * 0.0
    if regression:
        return F.mse_loss(s.reshape(-1), labels.to(torch.float32).reshape(-1))
    return F.cross_entropy(s, labels.long())


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT-style masked MSE between projected student and teacher states (ablation).

    (B, T, D') each; mean over real tokens and features; 0 when everything is padding.
    """
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    diff = (student_hidden.to(torch.float32) - teacher_hidden.to(torch.float32)) ** 2 * mask
    denom = mask.sum() * student_hidden.shape[-1]
    return diff.sum() / denom.clamp_min(1.0)


@torch.no_grad()
def mean_pairwise_cosine(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Mean cosine between the different sentences of a batch, each pooled over its real tokens
    (``pool``; mean by default): (B, T, D) -> fp32 scalar. Near 1 means every sentence has the
    same representation (a collapsed student); 0 for a batch of one. A monitoring signal, not a loss."""
    z = F.normalize(pool(hidden, attention_mask, mode), dim=-1, eps=NORM_EPS)  # (B, F)
    b = z.shape[0]
    if b < 2:
        return z.new_zeros(())
    cos = z @ z.T
    return (cos.sum() - cos.diagonal().sum()) / (b * (b - 1))


@dataclass(frozen=True)
class LossWeights:
    """alpha (COS-NCE), beta (soft), gamma (hard) for one step."""

    alpha: float
    beta: float
    gamma: float


def combine(parts: dict[str, torch.Tensor], weights: LossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The one place loss weights are applied.

    Args:
        parts: named unweighted terms; the intermediate one (``cos`` for COS-NCE, ``mse``
            for the hidden-state MSE ablation), ``soft`` and ``hard`` are weighted by alpha,
            beta and gamma; a missing term counts as 0; other names (per-layer values) are
            only logged. A term whose weight is 0 is not added at all (no NaN can leak in).

    Returns:
        (total, logs): total is the weighted fp32 scalar; logs holds every part plus
        ``total``, detached, for logging.
    """
    total = None
    for name, weight in (("cos", weights.alpha), ("mse", weights.alpha), ("soft", weights.beta),
                         ("hard", weights.gamma)):
        term = parts.get(name)
        if term is None or weight == 0.0:
            continue
        total = weight * term if total is None else total + weight * term
    if total is None:
        ref = next(iter(parts.values()), None)
        total = ref.sum() * 0.0 if ref is not None else torch.zeros(())
    logs = {k: v.detach().to(torch.float32) for k, v in parts.items()}
    logs["total"] = total.detach().to(torch.float32)
    return total, logs
