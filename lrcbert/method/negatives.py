"""Negatives from the global batch: teacher vectors of the *other* rows, for the task stage.

A negatives source is drawn once per micro-batch and returns a callable
``negatives(student_vectors) -> (sums, k)`` (per layer, ``(B,)`` sums of g(n_k, z_S) over
each row's K negatives), so the clean and the perturbed pass score against the same draw.
:func:`batch_negatives` is the task stage's source; ``MemoryBank.draw`` the general stage's.

Traffic does not grow with the world size W: teacher vectors stay on the rank that produced
them. For every global positive the draw picks ``c = min(W, ceil((K + 1) / B_min))`` distinct
owner ranks uniformly (B_min the smallest local batch), then K distinct rows uniformly from
the union of those owners' rows, never the positive itself; with c = W that is the whole
global batch (uniform over the other rows, as a full all-gather would give). Each owner sums
the normalized vectors the positives chose from it (``sum_k n_hat_k``, no gradient) and sends
those partial sums to the positives' ranks with one ``all_to_all_single``; a rank then
receives at most ``c x B_local x L x F`` values per micro-batch, whatever W is. Only the local
batch sizes and vector widths (W x (L + 1) int64) are all-gathered. Scoring a pass is local:
``sum_k g(n_k, z) = K - z_hat . sum_k n_hat_k``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrcbert.method.losses import NORM_EPS, pairwise_angular_distance
from lrcbert.runtime.ranks import rank_and_world

# student vectors per layer -> (negative-distance sums per layer, K)
Negatives = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], int]]


def sample_other_rows(batch_size: int, pool_size: int, offset: int, k: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, K) indices into the pool, K distinct rows per sample, never the sample's own row.

    Sample i's own row is ``offset + i``. ``k`` must be at most pool_size - 1.
    """
    if not 1 <= k <= pool_size - 1:
        raise ValueError(f"need 1 <= K <= {pool_size - 1} negatives from a pool of {pool_size}, got K={k}")
    scores = torch.rand(batch_size, pool_size, generator=generator)
    own = torch.arange(batch_size) + offset
    scores[torch.arange(batch_size), own] = 2.0  # rand is < 1: the own row is never among the K smallest
    return scores.topk(k, dim=1, largest=False).indices


def batch_negative_distance_sums(
    student_vectors: list[torch.Tensor],
    teacher_pool: list[torch.Tensor],
    neg_index: torch.Tensor,
) -> list[torch.Tensor]:
    """Per layer, sum over each sample's K negatives of g(n_k, z_S) (one-rank reference).

    Args:
        student_vectors: per layer (B, F_s) fp32 pooled student vectors (with grad).
        teacher_pool: per layer (P, F_p) teacher vectors (no grad).
        neg_index: (B, K) rows of the pool to use as each sample's negatives.

    Returns:
        per layer a (B,) tensor of negative-distance sums.
    """
    sums = []
    for z_s, pool in zip(student_vectors, teacher_pool):
        width = max(z_s.shape[1], pool.shape[1])
        z_s = F.pad(z_s, (0, width - z_s.shape[1]))
        pool = F.pad(pool, (0, width - pool.shape[1]))
        dists = pairwise_angular_distance(z_s, pool)  # (B, P)
        sums.append(dists.gather(1, neg_index.to(dists.device)).sum(1))
    return sums


def negative_generator(seed: int, step: int) -> torch.Generator:
    """The generator for one micro-step's batch negatives: a function of (seed, step) only,
    identical on every rank (the draw is made for the whole global batch everywhere), so the
    clean and perturbed passes and a resumed run draw the same rows."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009)


def owners_per_positive(k: int, sizes: list[int]) -> int:
    """c = min(W, ceil((K + 1) / B_min)): enough owners' rows for K negatives besides the positive."""
    smallest = min(sizes)
    if smallest < 1:
        return len(sizes)
    return min(len(sizes), math.ceil((k + 1) / smallest))


def draw_batch_rows(sizes: list[int], k: int, generator: torch.Generator) -> torch.Tensor:
    """(B_global, K) global rows (rank-major) drawn as negatives for every global positive.

    Per positive: c distinct owner ranks uniformly (``owners_per_positive``), then K distinct
    rows uniformly among those owners' rows except the positive's own. A function of
    (generator state, sizes, K) only, so every rank draws the same (a CPU generator).
    """
    world, batch = len(sizes), sum(sizes)
    if not 1 <= k <= batch - 1:
        raise ValueError(f"need 1 <= K <= {batch - 1} negatives from a global batch of {batch}, got K={k}")
    c = owners_per_positive(k, sizes)
    row_rank = torch.repeat_interleave(torch.arange(world), torch.tensor(sizes))  # (B,)
    owner_keys = torch.rand(batch, world, generator=generator)
    owners = owner_keys.topk(c, dim=1, largest=False).indices  # (B, c) distinct ranks
    allowed = torch.zeros(batch, world, dtype=torch.bool).scatter_(1, owners, True)
    pool = allowed[:, row_rank]  # (B, B): rows of the chosen owners
    pool[torch.arange(batch), torch.arange(batch)] = False  # never the positive itself
    keys = torch.rand(batch, batch, generator=generator).masked_fill_(~pool, 2.0)
    return keys.topk(k, dim=1, largest=False).indices


def _sizes_and_widths(vectors: list[torch.Tensor], world: int) -> tuple[list[int], list[int]]:
    """Every rank's local batch size and, per layer, the widest vector of any rank."""
    mine = [vectors[0].shape[0]] + [v.shape[1] for v in vectors]
    if world == 1:
        return mine[:1], mine[1:]
    local = torch.tensor(mine, dtype=torch.int64, device=vectors[0].device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    table = torch.stack(parts).cpu()
    return table[:, 0].tolist(), table[:, 1:].max(0).values.tolist()


def batch_negatives(teacher_vectors: list[torch.Tensor], num_negatives: int,
                    generator: torch.Generator) -> Negatives:
    """Negatives from the other rows of the global batch, drawn once (a collective: sizes and
    widths are all-gathered, the partial direction sums exchanged with one all_to_all_single).

    ``generator`` must be in the same state on every rank (``negative_generator``). K is
    capped at global batch - 1; with a global batch of one there is no negative and the
    returned source gives zero sums with K = 0. Vectors of different widths (flatten pooling
    of batches padded to different lengths) are zero-padded to the widest, which changes no
    cosine.
    """
    rank, world = rank_and_world()
    device = teacher_vectors[0].device
    sizes, widths = _sizes_and_widths(teacher_vectors, world)
    k = min(num_negatives, sum(sizes) - 1)
    if k < 1:
        return lambda student_vectors: ([torch.zeros(v.shape[0], device=v.device) for v in student_vectors], 0)
    rows = draw_batch_rows(sizes, k, generator).to(device)  # (B, K) global rows
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    # this rank's rows, normalized in fp32, padded to the widest, layers side by side: (B_local, sum widths)
    t_hat = torch.cat([F.pad(F.normalize(v.detach().float(), dim=-1, eps=NORM_EPS), (0, w - v.shape[1]))
                       for v, w in zip(teacher_vectors, widths)], dim=1)
    from_me = (rows >= lo) & (rows < hi)  # (B, K): drawn rows this rank holds
    targets = from_me.any(1).nonzero()[:, 0]  # positives this rank sends a partial sum to (rank-major)
    pair_row, pair_col = from_me[targets].nonzero(as_tuple=True)
    select = torch.zeros(targets.numel(), sizes[rank], device=device)
    select[pair_row, rows[targets][pair_row, pair_col] - lo] = 1.0  # distinct rows: each (row, negative) once
    partial = select @ t_hat  # (targets, sum widths)
    if world == 1:
        directions = partial  # every positive drew K rows of this rank: targets == all rows, in order
    else:
        row_rank = torch.repeat_interleave(torch.arange(world, device=device), torch.tensor(sizes, device=device))
        send = torch.bincount(row_rank[targets], minlength=world).tolist()
        has = torch.zeros(hi - lo, world, dtype=torch.bool, device=device)
        has.scatter_(1, row_rank[rows[lo:hi]], True)  # (B_local, W): which ranks send to each of my rows
        receive = has.sum(0).tolist()
        out = partial.new_empty(sum(receive), partial.shape[1])
        dist.all_to_all_single(out, partial.contiguous(), receive, send)
        where = has.t().nonzero()[:, 1]  # received rows come by source rank, then by local row
        directions = torch.zeros(hi - lo, partial.shape[1], device=device).index_add_(0, where, out)
    per_layer = directions.split(widths, dim=1)
    return _Scorer(per_layer, k)


class _Scorer:
    """Scores a pass against one batch draw: per layer, K - z_hat . sum_k n_hat_k (grad through z)."""

    def __init__(self, directions: tuple[torch.Tensor, ...], k: int):
        self.directions, self.k = directions, k

    def __call__(self, student_vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        sums = []
        for z, d in zip(student_vectors, self.directions):
            width = max(z.shape[1], d.shape[1])
            z_hat = F.normalize(F.pad(z.float(), (0, width - z.shape[1])), dim=-1, eps=NORM_EPS)
            sums.append(self.k - (z_hat * F.pad(d, (0, width - d.shape[1])).to(z_hat.device)).sum(-1))
        return sums, self.k
