"""Sharded FIFO memory bank of pooled teacher vectors, the `--negatives bank` source for COS-NCE.

The global bank is a ring of ``size`` slots per mapped layer. Each data-parallel rank owns
the slots ``s`` with ``s % world_size == rank`` (strided ownership: every global batch is
spread evenly over the ranks, and rank r's local row ``i`` is global slot ``i * world + r``).
Vectors are stored in a compact dtype (fp16 by default); all maths is fp32 with norms
clamped at 1e-6, so an all-zero vector has cosine 0 with everything.

Example ids are replicated on every rank (``size`` int64 values; cheap) so that negatives can
be drawn identically everywhere and a sample is never its own negative, even in a later epoch.

Typical loop (every rank, same order)::

    bank.validate(k, global_batch_size)       # before training
    negatives = bank.draw(ids, k)             # once per micro-batch: K slots per positive
    sums, k = negatives(z_S_clean)            # list of (B_local,) per layer
    sums, k = negatives(z_S_perturbed)        # the same draw scores the perturbed pass
    bank.hold(z_T, ids)                       # this micro-batch's teacher vectors
    ... engine.backward(loss); engine.step()
    bank.flush()                              # after the step: they join the bank

Vectors narrower than ``dim`` (flatten pooling of a batch padded to fewer tokens) are
zero-padded by the bank itself, which changes no cosine.

Checkpoints: each rank's shard differs, so save ``bank.state_dict()`` per rank (not as a
submodule of the DeepSpeed model, whose weights only rank 0 writes) and use
``MemoryBank.reshard`` when the world size changes.

This module deliberately imports only torch and torch.distributed (no deepspeed).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lrcbert.errors import UserError

_NORM_EPS = 1e-6
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step) pairs
_SHARD_KEYS = ("vectors", "ids", "write_ptr", "fill", "sample_step", "seed", "shard")


class MemoryBank(nn.Module):
    """FIFO ring of teacher vectors, ``size`` slots per layer, 1/world of it on each rank.

    Args:
        num_layers: mapped layers (one ring per layer, all sharing slots and ids).
        size: global slots per layer; must be divisible by ``world_size``.
        dim: length F of a pooled vector (flatten pooling: max_seq_length * hidden).
        rank, world_size: this rank in the data-parallel group ``group`` (default: WORLD).
        dtype: storage dtype (fp16, bf16 or fp32); maths is always fp32.
        device: where the shard lives (the student's device for NCCL).
        seed: seeds negative sampling; must be equal on all ranks.
        chunk_bytes: bound on the fp32 working copy of stored vectors (scoring is chunked).

    Buffers (all saved in ``state_dict``): ``vectors`` (L, size/world, F) the local shard;
    ``ids`` (size,) example id per global slot, -1 = empty; ``write_ptr`` next global slot;
    ``fill`` filled slots; ``sample_step`` draws made so far; ``seed``; ``shard`` [rank, world].
    """

    def __init__(
        self,
        num_layers: int,
        size: int,
        dim: int,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        *,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
        chunk_bytes: int = 256 * 2**20,
    ) -> None:
        super().__init__()
        if num_layers < 1 or size < 1 or dim < 1:
            raise UserError(f"memory bank needs positive num_layers, size and dim, got {num_layers}, {size}, {dim}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"memory bank rank {rank} is not in a world of size {world_size}")
        if size % world_size != 0:
            raise UserError(f"memory bank size {size} is not divisible by the data-parallel world size {world_size}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise UserError(f"memory bank dtype must be float16, bfloat16 or float32, got {dtype}")
        self.num_layers, self.size, self.dim = num_layers, size, dim
        self.rank, self.world_size, self.group = rank, world_size, group
        self.chunk_bytes = chunk_bytes
        long = dict(dtype=torch.int64, device=device)
        self.register_buffer("vectors", torch.zeros(num_layers, size // world_size, dim, dtype=dtype, device=device))
        self.register_buffer("ids", torch.full((size,), -1, **long))
        self.register_buffer("write_ptr", torch.zeros((), **long))
        self.register_buffer("fill", torch.zeros((), **long))
        self.register_buffer("sample_step", torch.zeros((), **long))
        self.register_buffer("seed", torch.tensor(seed, **long))
        self.register_buffer("shard", torch.tensor([rank, world_size], **long))
        self._held: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # this step's vectors, see hold()

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, size={self.size}, dim={self.dim}, rank={self.rank}, "
                f"world_size={self.world_size}, dtype={self.vectors.dtype}")

    # ----------------------------------------------------------------------------- helpers

    def bytes_per_rank(self) -> int:
        """Bytes of this rank's buffers (the vector shard dominates). Works on the meta device."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def validate(self, k: int, global_batch_size: int) -> None:
        """Check settings before training: 1 <= k < size and size >= global_batch_size.

        ``size`` must exceed ``k`` because one slot may hold the positive itself (excluded).
        """
        if k < 1:
            raise UserError(f"number of negatives must be at least 1, got {k}")
        if self.size <= k:
            raise UserError(f"memory bank size {self.size} must be larger than the number of negatives {k}")
        if self.size < global_batch_size:
            raise UserError(f"memory bank size {self.size} is smaller than the global batch size {global_batch_size}")

    def ready(self, k: int) -> bool:
        """True once at least k+1 slots are filled (k negatives left after excluding the positive)."""
        return int(self.fill) > k

    def make_generator(self, step: int) -> torch.Generator:
        """A generator seeded from (seed, step), identical on all ranks; e.g. to reuse one draw."""
        gen = torch.Generator(device=self.ids.device)
        gen.manual_seed((int(self.seed) * _SEED_MIX + step) % 2**63)
        return gen

    def _check_group(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"memory bank has world_size {self.world_size} but no process group is initialized")
        if dist.get_world_size(self.group) != self.world_size or dist.get_rank(self.group) != self.rank:
            raise UserError(f"memory bank is shard {self.rank} of {self.world_size} but this process is rank "
                            f"{dist.get_rank(self.group)} of {dist.get_world_size(self.group)}")

    def _batch_sizes(self, b_local: int) -> list[int]:
        """Local batch sizes of all ranks, in rank order (global row order is rank-major)."""
        if self.world_size == 1:
            return [b_local]
        self._check_group()
        mine = torch.tensor([b_local], dtype=torch.int64, device=self.ids.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return [int(t) for t in out]

    def _gather_rows(self, x: torch.Tensor, sizes: list[int], autograd: bool) -> torch.Tensor:
        """Concatenate every rank's ``x`` (rows along dim -2) in rank order; pads unequal sizes."""
        if self.world_size == 1:
            return x
        rows = max(sizes)
        if x.shape[-2] < rows:  # all_gather needs equal shapes
            pad = x.new_zeros(*x.shape[:-2], rows - x.shape[-2], x.shape[-1])
            x = torch.cat([x, pad], dim=-2)
        if autograd:
            with warnings.catch_warnings():  # the autograd collectives are marked deprecated
                warnings.simplefilter("ignore", FutureWarning)
                parts = torch.distributed.nn.functional.all_gather(x.contiguous(), group=self.group)
        else:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p[..., :n, :] for p, n in zip(parts, sizes)], dim=-2)

    # ----------------------------------------------------------------------------- enqueue

    def fit(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer ``(B, F')`` with ``F' <= dim`` -> ``(B, dim)``, zero-padded at the end.

        Flatten pooling of a batch padded to fewer than ``max_seq_length`` tokens gives shorter
        vectors; the extra zeros are all-padding token rows, which change no cosine.
        """
        if len(vectors) != self.num_layers:
            raise UserError(f"memory bank has {self.num_layers} layers but got {len(vectors)} vector sets")
        out = []
        for vec in vectors:
            if vec.dim() != 2 or vec.shape[1] > self.dim:
                raise UserError(f"memory bank expects (B, F) vectors per layer with F at most {self.dim}, "
                                f"got {tuple(vec.shape)}")
            out.append(F.pad(vec, (0, self.dim - vec.shape[1])))
        return out

    @torch.no_grad()
    def hold(self, teacher_vectors: list[torch.Tensor], example_ids: torch.Tensor) -> None:
        """Keep one micro-batch's teacher vectors (in the storage dtype) until :meth:`flush`.

        All micro-batches of an optimizer step score against the same bank contents; their
        vectors join it once the step is taken.
        """
        vectors = [v.to(self.vectors.dtype) for v in self.fit([v.detach() for v in teacher_vectors])]
        self._held.append((vectors, torch.as_tensor(example_ids).detach()))

    def flush(self) -> None:
        """Enqueue everything :meth:`hold` kept, in order (every rank, after the optimizer step)."""
        held, self._held = self._held, []
        for vectors, ids in held:
            self.enqueue(vectors, ids)

    @torch.no_grad()
    def enqueue(self, teacher_vectors: list[torch.Tensor], example_ids: torch.Tensor) -> None:
        """Append this step's global batch of teacher vectors (call on every rank, after the step).

        Args:
            teacher_vectors: per layer, this rank's ``(B_local, F)`` pooled teacher vectors,
                ``F <= dim`` (zero-padded to ``dim``).
            example_ids: ``(B_local,)`` non-negative dataset ids of those rows.

        The global batch (rank-major order) is gathered; global row j goes to slot
        ``(write_ptr + j) % size`` (oldest entries are overwritten) and each rank stores the
        slots it owns. Vectors are cast to the storage dtype (values past fp16 range become inf).
        """
        teacher_vectors = self.fit(teacher_vectors)
        ids = self._check_ids(example_ids, teacher_vectors[0].shape[0])
        sizes = self._batch_sizes(ids.numel())
        batch = sum(sizes)
        if batch > self.size:
            raise UserError(f"global batch of {batch} does not fit a memory bank of {self.size} slots")
        ids_global = self._gather_rows(ids[:, None], sizes, autograd=False)[:, 0]  # (B,)
        slots = (self.write_ptr + torch.arange(batch, device=self.ids.device)) % self.size
        self.ids[slots] = ids_global
        owned = slots % self.world_size == self.rank
        local = slots[owned] // self.world_size
        for layer, vec in enumerate(teacher_vectors):
            rows = self._gather_rows(vec.detach().to(self.vectors), sizes, autograd=False)  # (B, F)
            self.vectors[layer, local] = rows[owned]
        self.write_ptr.copy_((self.write_ptr + batch) % self.size)
        self.fill.clamp_(max=self.size - batch).add_(batch)

    def _check_ids(self, example_ids: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        ids = torch.as_tensor(example_ids, device=self.ids.device).reshape(-1).long()
        if rows is not None and ids.numel() != rows:
            raise UserError(f"memory bank got {ids.numel()} example ids for {rows} vectors")
        if ids.numel() and int(ids.min()) < 0:
            raise UserError("example ids given to the memory bank must be non-negative")
        return ids

    # ----------------------------------------------------------------------------- negatives

    def sample_slots(self, positive_ids: torch.Tensor, k: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, k)`` global slots, per row uniform without replacement over filled slots whose
        id differs from that row's id. Same ids + same generator state -> same slots on every rank.

        With ``generator=None`` the bank's own stream is used: seeded from (seed, sample_step),
        and ``sample_step`` advances by one (it is checkpointed, so resumes draw the same).
        """
        if generator is None:
            generator = self.make_generator(int(self.sample_step))
            self.sample_step += 1
        valid = (self.ids >= 0)[None, :] & (self.ids[None, :] != positive_ids[:, None])  # (B, size)
        short = valid.sum(1) < k
        if bool(short.any()):
            row = int(short.nonzero()[0, 0])
            raise UserError(f"memory bank holds {int(valid[row].sum())} negatives for example id "
                            f"{int(positive_ids[row])}, fewer than k={k}; fill it before sampling")
        keys = torch.rand(valid.shape, generator=generator, device=generator.device).to(self.ids.device)
        keys.masked_fill_(~valid, 2.0)  # invalid slots sort after every uniform key in [0, 1)
        return keys.topk(k, dim=1, largest=False).indices

    @torch.no_grad()
    def draw(self, example_ids: torch.Tensor, k: int, generator: torch.Generator | None = None) -> BankNegatives:
        """Draw K negatives for every positive of the global batch, once per micro-step.

        Args:
            example_ids: ``(B_local,)`` ids of this rank's positives; a slot holding the same
                id is never drawn.
            k: negatives per positive (UserError if the filled bank has too few).
            generator: see ``sample_slots``; must be in the same state on all ranks.

        A collective (gathers the ids): every rank calls it in the same order. The no-grad half
        of the scoring happens here: for each global row, how many of its drawn slots this rank
        owns and the sum of their normalized vectors per layer. The returned
        :class:`BankNegatives` scores any number of student passes (the clean and the perturbed
        one) against this one draw.
        """
        if k < 1:
            raise UserError(f"number of negatives must be at least 1, got {k}")
        if k > int(self.fill):
            raise UserError(f"asked for {k} negatives but the memory bank holds only {int(self.fill)} vectors")
        ids = self._check_ids(example_ids)
        sizes = self._batch_sizes(ids.numel())
        ids_global = self._gather_rows(ids[:, None], sizes, autograd=False)[:, 0]  # (B,)
        slots = self.sample_slots(ids_global, k, generator)  # (B, K)
        owned = slots % self.world_size == self.rank
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)[owned]
        local, column = torch.unique(slots[owned] // self.world_size, return_inverse=True)
        select = torch.zeros(slots.shape[0], local.numel(), device=slots.device)  # M: (B, U)
        select[rows, column] = 1.0  # without replacement: each (row, slot) at most once
        directions = torch.zeros(self.num_layers, select.shape[0], self.dim, device=select.device)
        for layer in range(self.num_layers):
            self._direction_sums(layer, local, select, directions[layer])
        return BankNegatives(self, k, select.sum(1), directions, sizes)

    def negative_distance_sums(self, student_vectors: list[torch.Tensor], example_ids: torch.Tensor, k: int,
                               generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], int]:
        """One pass scored against a fresh draw: ``draw(example_ids, k, generator)(student_vectors)``."""
        return self.draw(example_ids, k, generator)(student_vectors)

    @torch.no_grad()
    def _direction_sums(self, layer: int, local: torch.Tensor, select: torch.Tensor, out: torch.Tensor) -> None:
        """Adds select @ normalize(vectors[layer, local]) into ``out`` (B, F), fp32, chunked over slots."""
        chunk = max(1, self.chunk_bytes // (4 * self.dim))
        for start in range(0, local.numel(), chunk):
            stored = self.vectors[layer, local[start: start + chunk]].float()
            out.addmm_(select[:, start: start + chunk], F.normalize(stored, dim=-1, eps=_NORM_EPS))

    # ----------------------------------------------------------------------------- state

    @torch.no_grad()
    def global_contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (L, size, F) storage dtype, ids (size,))`` in global slot order, on every rank."""
        if self.world_size == 1:
            return self.vectors.clone(), self.ids.clone()
        self._check_group()
        parts = [torch.empty_like(self.vectors) for _ in range(self.world_size)]
        dist.all_gather(parts, self.vectors.contiguous(), group=self.group)
        return _interleave(parts), self.ids.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        shard = state_dict.get(prefix + "shard")
        if shard is not None and shard.tolist() != self.shard.tolist():
            saved_rank, saved_world = shard.tolist()
            raise UserError(f"memory bank checkpoint is shard {saved_rank} of {saved_world} but this run is shard "
                            f"{self.rank} of {self.world_size}; convert it with MemoryBank.reshard")
        vectors = state_dict.get(prefix + "vectors")
        if vectors is not None and vectors.shape != self.vectors.shape:
            raise UserError(f"memory bank checkpoint has shape {tuple(vectors.shape)} but this run expects "
                            f"{tuple(self.vectors.shape)} (layers, slots per rank, dim)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def reshard(shards: list[dict[str, torch.Tensor]], new_world_size: int) -> list[dict[str, torch.Tensor]]:
        """Convert the per-rank ``state_dict()``s of one world size into ``new_world_size`` shards.

        Pure function (no process group): global contents, slot order, write pointer, fill,
        ids and sampling state are preserved. Holds the whole bank in memory once.
        """
        if not shards:
            raise UserError("reshard needs at least one memory bank shard")
        world = len(shards)
        for rank, shard in enumerate(shards):
            missing = [key for key in _SHARD_KEYS if key not in shard]
            if missing:
                raise UserError(f"memory bank shard {rank} lacks {', '.join(missing)}")
            if shard["shard"].tolist() != [rank, world]:
                raise UserError(f"memory bank shard {rank} of {world} is labelled {shard['shard'].tolist()}")
            for key in _SHARD_KEYS[1:6]:
                if not torch.equal(shard[key], shards[0][key]):
                    raise UserError(f"memory bank shards disagree on {key}; they are not from one checkpoint")
        size = shards[0]["ids"].numel()
        if new_world_size < 1 or size % new_world_size != 0:
            raise UserError(f"memory bank size {size} is not divisible by the new world size {new_world_size}")
        full = _interleave([shard["vectors"] for shard in shards])  # (L, size, F)
        out = []
        for rank in range(new_world_size):
            new = {key: shards[0][key].clone() for key in _SHARD_KEYS[1:6]}
            new["vectors"] = full[:, rank::new_world_size].clone()
            new["shard"] = torch.tensor([rank, new_world_size], dtype=torch.int64)
            out.append(new)
        return out


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Strided shards [(L, n, F)] * world -> (L, n * world, F); global slot = i * world + rank."""
    stacked = torch.stack(parts, dim=2)  # (L, n, world, F)
    return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])


class BankNegatives:
    """One draw of bank negatives (:meth:`MemoryBank.draw`); call it once per student pass.

    ``negatives(student_vectors) -> (sums, k)``: per layer, ``(B_local,)`` sums over each
    positive's K drawn negatives of g(n_k, z_S) = 1 - cos(n_k, z_S); ``sums[l][i]`` belongs to
    this rank's row i. ``student_vectors`` are this rank's ``(B_local, F)`` projected, pooled
    student vectors per layer (with grad; fp32 maths; zero-padded to the bank's ``dim``).

    Every rank must call it (and later backward) in the same order. Positives of all ranks are
    gathered (autograd all_gather), each rank scores them against the drawn slots it owns, and
    the partial sums are added with an autograd all_reduce; each rank keeps its own rows.
    Results do not depend on the world size.

    Gradient convention: backward of the all_reduce sums the output gradients of all ranks,
    and backward of the all_gather sums every rank's gradient for a rank's rows. Rank r's
    student vectors therefore receive exactly dL_r/dz_r, where L_r is the loss rank r builds
    from its own returned rows: the same gradient a one-rank run gives those rows. Hence with
    L_r = mean over local rows and DeepSpeed averaging gradients over ranks, the update equals
    a one-rank run on the global batch with loss = mean over all global rows (equal local
    batch sizes). Do not rescale the loss by the world size.

    Memory: never forms (B, K, F). sum_k cos(z, n_k) = z_hat . sum_k n_hat_k, so the draw
    holds Q = M @ N_hat (M the (B_global, owned drawn slots) 0/1 selection, N_hat the
    normalized owned rows) and a pass scores ``count - (z_hat * Q).sum(1)``: working memory
    O(B_global * F) per layer.
    """

    def __init__(self, bank: MemoryBank, k: int, counts: torch.Tensor, directions: torch.Tensor,
                 sizes: list[int]):
        self.bank, self.k = bank, k
        self.counts = counts  # (B,) drawn slots this rank owns, per global row
        self.directions = directions  # (L, B, dim) sum of their normalized vectors
        self.sizes = sizes  # local batch size of every rank
        self.offset = sum(sizes[: bank.rank])

    def __call__(self, student_vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        bank = self.bank
        local_rows = self.sizes[bank.rank]
        if any(z.shape[0] != local_rows for z in student_vectors):
            raise UserError(f"memory bank negatives were drawn for {local_rows} rows but got "
                            f"{[tuple(z.shape) for z in student_vectors]}")
        z_local = torch.stack([z.float() for z in bank.fit(student_vectors)])  # (L, B_local, dim)
        z = bank._gather_rows(z_local, self.sizes, autograd=True)  # (L, B, dim)
        z_hat = F.normalize(z, dim=-1, eps=_NORM_EPS)
        partial = self.counts - (z_hat * self.directions).sum(-1)  # (L, B)
        if bank.world_size > 1:
            with warnings.catch_warnings():  # the autograd collectives are marked deprecated
                warnings.simplefilter("ignore", FutureWarning)
                partial = torch.distributed.nn.functional.all_reduce(partial, group=bank.group)
        mine = partial[:, self.offset: self.offset + local_rows]
        return list(mine.unbind(0)), self.k
