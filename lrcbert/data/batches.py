"""Tokenized examples, padded batches, and the data-parallel training order.

Every rank gets the same number of micro-batches per epoch (the global remainder is
dropped), so no rank waits at a collective for one that ran out of data. The position in
the data is one integer, the number of micro-batches consumed, saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Encoded:
    """Token ids per example, plus labels (class ids / floats, or None) and source indices."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list | None
    index: list

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, text_a: list[str], text_b: list[str] | None, labels, index, max_seq_length: int,
           batch_size: int = 2048) -> Encoded:
    """Batched fast tokenization, truncated to ``max_seq_length`` (special tokens included)."""
    ids, types = [], []
    for start in range(0, len(text_a), batch_size):
        a = text_a[start:start + batch_size]
        b = text_b[start:start + batch_size] if text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length, return_token_type_ids=True)
        ids.extend(enc["input_ids"])
        types.extend(enc["token_type_ids"])
    return Encoded(ids, types, list(labels) if labels is not None else None, list(index))


def collate(data: Encoded, rows, pad_id: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """Pad the chosen rows to the longest among them: (B, T) tensors, plus labels (B,)."""
    rows = [int(r) for r in rows]
    length = max(len(data.input_ids[r]) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((batch, length), dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(data.input_ids[r])
        input_ids[i, :n] = torch.tensor(data.input_ids[r])
        token_type_ids[i, :n] = torch.tensor(data.token_type_ids[r])
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
           "rows": torch.tensor(rows, dtype=torch.long)}
    if data.labels is not None:
        out["labels"] = torch.tensor([data.labels[r] for r in rows],
                                     dtype=torch.float32 if regression else torch.long)
    return out


class TrainOrder:
    """Which rows each rank trains on at each micro-step.

    Epoch e uses a permutation drawn from ``seed + e``; a global micro-batch is
    ``micro_batch_size * world_size`` consecutive rows of it and rank r takes its r-th
    slice. Micro-batches per epoch are rounded down to whole optimizer steps.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, world_size: int, rank: int,
                 gradient_accumulation_steps: int, seed: int):
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.world_size = world_size
        self.rank = rank
        self.accumulation = gradient_accumulation_steps
        self.seed = seed
        global_micro = micro_batch_size * world_size
        self.steps_per_epoch = num_examples // global_micro // gradient_accumulation_steps
        self.micro_batches_per_epoch = self.steps_per_epoch * gradient_accumulation_steps
        self._perm_epoch = -1
        self._perm = None

    def rows(self, micro_step: int) -> np.ndarray:
        """Rows of this rank's micro-batch number ``micro_step`` (counted from the run's start)."""
        epoch, within = divmod(micro_step, self.micro_batches_per_epoch)
        if epoch != self._perm_epoch:
            gen = np.random.default_rng(self.seed + epoch)
            self._perm = gen.permutation(self.num_examples)
            self._perm_epoch = epoch
        start = within * self.micro_batch_size * self.world_size + self.rank * self.micro_batch_size
        return self._perm[start:start + self.micro_batch_size]


def eval_shard(num_examples: int, micro_batch_size: int, rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's eval micro-batches: rows rank, rank + world, ...; every rank gets the same
    number of batches (the last rows repeat; callers drop duplicates by row), so ZeRO-3's
    collective parameter gathering never waits on a rank that has finished."""
    per_rank = -(-num_examples // world_size)
    rows = np.arange(rank, per_rank * world_size, world_size)
    rows = np.minimum(rows, num_examples - 1)
    return [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
