"""Negatives from the global batch: teacher vectors of the *other* rows on every rank.

A negatives source is drawn once per micro-batch and returns a callable
``negatives(student_vectors) -> (sums, k)`` (per layer, ``(B,)`` sums of g(n_k, z_S) over
each row's K negatives), so the clean and the perturbed pass score against the same draw.
:func:`batch_negatives` is the task stage's source; ``MemoryBank.draw`` the general stage's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lrcbert.method.losses import pairwise_angular_distance
from lrcbert.runtime.ranks import rank_and_world

# student vectors per layer -> (negative-distance sums per layer, K)
Negatives = Callable[[list[torch.Tensor]], tuple[list[torch.Tensor], int]]


def gather_teacher_vectors(vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """All-gather each layer's (B, F) teacher vectors over data-parallel ranks (no grad).

    Widths may differ between ranks (``flatten`` pooling of batches padded to different
    lengths); shorter ones are zero-padded, which changes no cosine because the padding
    corresponds to extra all-padding token rows.

    Returns:
        (per-layer (world * B, F_max) tensors in rank order, offset of this rank's rows).
    """
    rank, world = rank_and_world()
    batch = vectors[0].shape[0]
    if world == 1:
        return [v.detach() for v in vectors], 0
    widths = torch.tensor([v.shape[1] for v in vectors], dtype=torch.long, device=vectors[0].device)
    all_widths = [torch.empty_like(widths) for _ in range(world)]
    dist.all_gather(all_widths, widths)
    max_widths = torch.stack(all_widths).max(0).values.tolist()
    gathered = []
    for v, width in zip(vectors, max_widths):
        v = F.pad(v.detach(), (0, width - v.shape[1])).contiguous()
        parts = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(parts, v)
        gathered.append(torch.cat(parts))
    return gathered, rank * batch


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
    """Per layer, sum over each sample's K negatives of g(n_k, z_S).

    Args:
        student_vectors: per layer (B, F_s) fp32 pooled student vectors (with grad).
        teacher_pool: per layer (P, F_p) gathered teacher vectors (no grad).
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


def negative_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator for one micro-step's batch negatives: a function of (seed, step, rank)
    only, so the clean and perturbed passes and a resumed run draw the same rows."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)


def batch_negatives(teacher_vectors: list[torch.Tensor], num_negatives: int,
                    generator: torch.Generator) -> Negatives:
    """Negatives from the other rows of the global batch, drawn once (a collective: gathers
    every rank's teacher vectors). K is capped at global batch - 1; with a global batch of
    one there is no negative and the returned source gives zero sums with K = 0."""
    pool, offset = gather_teacher_vectors(teacher_vectors)
    global_batch = pool[0].shape[0]
    k = min(num_negatives, global_batch - 1)
    if k < 1:
        return lambda student_vectors: ([torch.zeros(v.shape[0]) for v in student_vectors], 0)
    neg_index = sample_other_rows(teacher_vectors[0].shape[0], global_batch, offset, k, generator)
    return lambda student_vectors: (batch_negative_distance_sums(student_vectors, pool, neg_index), k)
