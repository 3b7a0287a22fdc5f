"""Sharded, grouped FIFO memory bank of pooled teacher vectors, the `--negatives bank` source for COS-NCE.

Layout. The bank's ``size`` slots per mapped layer are split into ``groups`` fixed groups of
``size // groups`` slots (``groups`` divisible by the data-parallel world size). Group ``g``
lives on rank ``g % world_size``; its slots are global slots ``g * slots_per_group + j``. Each
group is its own FIFO ring with its own write pointer and fill. Example ids, group pointers,
group fills and the enqueue cursors are small and replicated on every rank; the vectors are
not: each rank stores only its ``groups // world_size`` groups (1/world of the bank).

Traffic per rank per micro-batch does not grow with the world size (except the example ids,
B_global int64 values, which are all-gathered):

* ``enqueue`` keeps rows where they were produced: each rank writes its own rows into its
  own groups, row ``i`` of an enqueue into its local group ``(cursor[rank] + i) % groups_per_rank``
  (``cursor[rank]`` then advances by the local batch size). Only ids and local batch sizes are
  gathered, so every rank can update the replicated ids, pointers, fills and cursors.
* ``draw`` gathers the positives' ids, then for every global positive chooses ONE group
  uniformly among the groups holding at least k filled slots whose id differs from the
  positive's, and k distinct valid slots of that group uniformly. The group's owner sums the
  k normalized vectors per layer (``D_i = sum_k n_hat_k``, one ``embedding_bag``) and sends ``D_i`` to
  the positive's rank with one ``all_to_all_single`` (no-grad). A rank receives exactly
  ``B_local x L x dim`` fp32 values per draw and sends that many on average.
* scoring a student pass is local: ``sum_k g(n_k, z) = k - z_hat . D`` per layer and row.

The draw is a function of (generator state, positive ids in global order, replicated ids and
fills) only, not of the world size: the same positives against the same contents draw the
same slots at any world size. With equally filled groups each negative is uniform over the bank.

Vectors are stored normalized (all-zero stays zero) in a compact dtype (fp16 by default, so
large teacher activations cannot overflow it); the draw renormalizes the stored rows in fp32,
so all maths is fp32 cosine with what is stored, norms clamped at 1e-6 (an all-zero vector has
cosine 0 with everything).

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
``MemoryBank.reshard`` when the world size changes: it moves whole groups (group g to rank
``g % new_world``), so the new world size must divide ``groups``. The enqueue cursors restart
at 0 after a reshard (each new rank starts writing at its first group); contents, ids,
pointers, fills and the sampling stream are kept. Checkpoints of the earlier ungrouped layout
(no ``groups`` entry) cannot be converted.

This module deliberately imports only torch and torch.distributed (no deepspeed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lrcbert.errors import UserError

_NORM_EPS = 1e-6
DEFAULT_GROUPS = 64  # the recipe's --bank_groups default; see resolve_groups
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step) pairs
_REPLICATED = ("ids", "group_ptr", "group_fill", "fill", "sample_step", "seed", "groups")
_SHARD_KEYS = ("vectors", *_REPLICATED, "cursor", "shard")


def resolve_groups(size: int, groups: int, k: int) -> int:
    """The number of groups to use: ``groups`` if it divides ``size`` into groups of more than
    ``k`` slots, else the largest smaller number that does (at least 1). Independent of the
    world size, so a checkpoint can be resumed at any world size that divides the result."""
    if groups < 1:
        raise UserError(f"--bank_groups must be at least 1, got {groups}")
    for candidate in range(min(groups, size), 0, -1):
        if size % candidate == 0 and size // candidate > k:
            return candidate
    return 1  # size <= k: validate() names the problem


class MemoryBank(nn.Module):
    """Grouped FIFO rings of teacher vectors, ``size`` slots per layer, 1/world of them on each rank.

    Args:
        num_layers: mapped layers (one ring per layer, all sharing slots and ids).
        size: global slots per layer; divisible by ``groups``.
        dim: length F of a pooled vector (flatten pooling: max_seq_length * hidden).
        rank, world_size: this rank in the data-parallel group ``group`` (default: WORLD).
        dtype: storage dtype (fp16, bf16 or fp32): rows are normalized in fp32, stored in it, and
            summed per positive in it (see ``_direction_sums``); the scoring is fp32.
        device: where the shard lives (the student's device for NCCL).
        groups: fixed groups of ``size // groups`` slots; ``world_size`` must divide it
            (default: ``world_size``, one group per rank; the recipe's ``--bank_groups`` picks a
            number that does not depend on the world size, so that a run can be resumed at another).
        seed: seeds negative sampling; must be equal on all ranks.

    Buffers (all saved in ``state_dict``): ``vectors`` (L, size/world, F) this rank's groups
    (local group ``q`` is global group ``q * world + rank``); replicated: ``ids`` (size,) example
    id per global slot, -1 = empty; ``group_ptr`` and ``group_fill`` (groups,); ``fill`` filled
    slots in all; ``cursor`` (world,) next local group of each rank's enqueue; ``sample_step``
    draws made so far; ``seed``; ``groups``; ``shard`` [rank, world].
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
        groups: int | None = None,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        groups = world_size if groups is None else groups
        if num_layers < 1 or size < 1 or dim < 1 or groups < 1:
            raise UserError(f"memory bank needs positive num_layers, size, dim and groups, got {num_layers}, "
                            f"{size}, {dim}, {groups}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"memory bank rank {rank} is not in a world of size {world_size}")
        if size % groups != 0:
            raise UserError(f"memory bank size {size} is not divisible by its {groups} groups (--bank_groups)")
        if groups % world_size != 0:
            raise UserError(f"memory bank groups {groups} (--bank_groups) are not divisible by the data-parallel "
                            f"world size {world_size}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise UserError(f"memory bank dtype must be float16, bfloat16 or float32, got {dtype}")
        self.num_layers, self.size, self.dim = num_layers, size, dim
        self.rank, self.world_size, self.group = rank, world_size, group
        self.num_groups, self.slots_per_group = groups, size // groups
        self.local_groups = groups // world_size
        long = dict(dtype=torch.int64, device=device)
        self.register_buffer("vectors", torch.zeros(num_layers, size // world_size, dim, dtype=dtype, device=device))
        self.register_buffer("ids", torch.full((size,), -1, **long))
        self.register_buffer("group_ptr", torch.zeros(groups, **long))
        self.register_buffer("group_fill", torch.zeros(groups, **long))
        self.register_buffer("fill", torch.zeros((), **long))
        self.register_buffer("cursor", torch.zeros(world_size, **long))
        self.register_buffer("sample_step", torch.zeros((), **long))
        self.register_buffer("seed", torch.tensor(seed, **long))
        self.register_buffer("groups", torch.tensor(groups, **long))
        self.register_buffer("shard", torch.tensor([rank, world_size], **long))
        self._held: list[tuple[list[torch.Tensor], torch.Tensor]] = []  # this step's vectors, see hold()

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, size={self.size}, dim={self.dim}, groups={self.num_groups}, "
                f"rank={self.rank}, world_size={self.world_size}, dtype={self.vectors.dtype}")

    # ----------------------------------------------------------------------------- helpers

    def bytes_per_rank(self) -> int:
        """Bytes of this rank's buffers (the vector shard dominates). Works on the meta device."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def validate(self, k: int, global_batch_size: int) -> None:
        """Check settings before training: k >= 1, a group holds more than k slots, and the
        bank holds a global batch (each rank writes its rows into its own groups)."""
        if k < 1:
            raise UserError(f"number of negatives must be at least 1, got {k}")
        if self.slots_per_group <= k:
            raise UserError(f"memory bank groups of {self.slots_per_group} slots ({self.size} slots / "
                            f"{self.num_groups} groups, --bank_groups) must be larger than the number of "
                            f"negatives {k}")
        if self.size < global_batch_size:
            raise UserError(f"memory bank size {self.size} is smaller than the global batch size {global_batch_size}")

    def _group_serves_any(self, k: int) -> torch.Tensor:
        """(groups,) bool: the group holds k valid negatives whatever the positive's id is
        (its fill minus the most repeated id's count is at least k). Vectorized: no sync."""
        groups, per_group = self.num_groups, self.slots_per_group
        ids = self.ids.view(groups, per_group).sort(dim=1).values
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]  # a new run of equal ids
        runs = starts.long().cumsum(1) - 1 + torch.arange(groups, device=ids.device)[:, None] * per_group
        counts = torch.bincount(runs[ids >= 0], minlength=groups * per_group).view(groups, per_group)
        return self.group_fill - counts.max(1).values >= k

    def ready(self, k: int) -> bool:
        """True once some group can serve k negatives for any positive: it holds k filled
        slots besides every slot of its most repeated id (k + 1 filled slots when its ids are
        distinct). Replicated state only: the same answer on every rank."""
        return bool(self._group_serves_any(k).any())

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

    def _gather_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Every rank's ids in rank order (global rows are rank-major) and the local batch sizes.
        Two small all_gathers: the sizes (world int64) and the ids padded to the largest batch."""
        if self.world_size == 1:
            return ids, [ids.numel()]
        self._check_group()
        mine = torch.tensor([ids.numel()], dtype=torch.int64, device=self.ids.device)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        sizes = [int(t) for t in out]
        padded = F.pad(ids, (0, max(sizes) - ids.numel()), value=-1)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes

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

    def _store(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Padded to ``dim``, normalized in fp32 (zero stays zero), cast to the storage dtype."""
        return [F.normalize(v.detach().float(), dim=-1, eps=_NORM_EPS).to(self.vectors.dtype)
                for v in self.fit(vectors)]

    @torch.no_grad()
    def hold(self, teacher_vectors: list[torch.Tensor], example_ids: torch.Tensor) -> None:
        """Keep one micro-batch's teacher vectors (normalized, storage dtype) until :meth:`flush`.

        All micro-batches of an optimizer step score against the same bank contents; their
        vectors join it once the step is taken.
        """
        self._held.append((self._store(teacher_vectors), torch.as_tensor(example_ids).detach()))

    def flush(self) -> None:
        """Enqueue everything :meth:`hold` kept, in order (every rank, after the optimizer step)."""
        held, self._held = self._held, []
        for vectors, ids in held:
            self.enqueue(vectors, ids)

    def _placement(self, owner: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(global groups, positions in the group) of ``rows`` rows enqueued by rank ``owner``
        now: row i goes to its local group (cursor + i) % groups_per_rank, after the rows
        before it in that group (pointers not yet advanced)."""
        device = self.ids.device
        i = torch.arange(rows, device=device)
        local = (self.cursor[owner] + i) % self.local_groups
        groups = local * self.world_size + owner
        positions = (self.group_ptr[groups] + i // self.local_groups) % self.slots_per_group
        return groups, positions

    @torch.no_grad()
    def enqueue(self, teacher_vectors: list[torch.Tensor], example_ids: torch.Tensor) -> None:
        """Append this rank's rows (call on every rank, in the same order, after the step).

        Args:
            teacher_vectors: per layer, this rank's ``(B_local, F)`` pooled teacher vectors,
                ``F <= dim`` (zero-padded to ``dim``, stored normalized).
            example_ids: ``(B_local,)`` non-negative dataset ids of those rows.

        The rows stay on this rank: row i goes into local group ``(cursor[rank] + i) %
        groups_per_rank`` at that group's write pointer (its oldest entry is overwritten). Only
        the ids and batch sizes are gathered, to update the replicated ids, pointers and fills.
        """
        vectors = self._store(teacher_vectors)
        ids = self._check_ids(example_ids, vectors[0].shape[0])
        if ids.numel() > self.size // self.world_size:
            raise UserError(f"local batch of {ids.numel()} does not fit this rank's {self.size // self.world_size} "
                            f"memory bank slots")
        ids_global, sizes = self._gather_ids(ids)
        if max(sizes) > self.size // self.world_size:
            raise UserError(f"a local batch of {max(sizes)} does not fit a rank's {self.size // self.world_size} "
                            f"memory bank slots")
        offsets = [sum(sizes[:r]) for r in range(self.world_size)]
        counts = torch.zeros(self.num_groups, dtype=torch.int64, device=self.ids.device)
        for owner, rows in enumerate(sizes):
            groups, positions = self._placement(owner, rows)
            self.ids[groups * self.slots_per_group + positions] = ids_global[offsets[owner]: offsets[owner] + rows]
            if owner == self.rank:
                local = (groups // self.world_size) * self.slots_per_group + positions
                for layer, vec in enumerate(vectors):
                    self.vectors[layer, local] = vec.to(self.vectors)
            counts += torch.bincount(groups, minlength=self.num_groups)
            self.cursor[owner] = (self.cursor[owner] + rows) % self.local_groups
        self.group_ptr.copy_((self.group_ptr + counts) % self.slots_per_group)
        self.group_fill.copy_((self.group_fill + counts).clamp(max=self.slots_per_group))
        self.fill.copy_(self.group_fill.sum())

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
        """``(B, k)`` global slots: per positive, one group uniformly among the groups holding at
        least k filled slots whose id differs from the positive's, then k distinct such slots of
        it uniformly. A function of (generator state, ids in this order, replicated contents)
        only: the same on every rank and at every world size.

        With ``generator=None`` the bank's own stream is used: seeded from (seed, sample_step),
        and ``sample_step`` advances by one (it is checkpointed, so resumes draw the same).
        """
        if generator is None:
            generator = self.make_generator(int(self.sample_step))
            self.sample_step += 1
        positive_ids = positive_ids.to(self.ids.device)
        batch, groups, per_group = positive_ids.numel(), self.num_groups, self.slots_per_group
        valid = (self.ids >= 0)[None, :] & (self.ids[None, :] != positive_ids[:, None])  # (B, size)
        valid = valid.view(batch, groups, per_group)
        eligible = valid.sum(-1) >= k  # (B, groups)
        short = ~eligible.any(1)
        if bool(short.any()):
            row = int(short.nonzero()[0, 0])
            raise UserError(f"no memory bank group holds {k} negatives for example id {int(positive_ids[row])} "
                            f"(groups of {per_group} slots, fills {self.group_fill.tolist()}); fill it before "
                            f"sampling")
        group_keys = torch.rand(batch, groups, generator=generator, device=generator.device).to(self.ids.device)
        chosen = group_keys.masked_fill_(~eligible, 2.0).argmin(1)  # (B,) uniform over eligible groups
        slot_keys = torch.rand(batch, per_group, generator=generator, device=generator.device).to(self.ids.device)
        slot_keys.masked_fill_(~valid[torch.arange(batch, device=valid.device), chosen], 2.0)
        within = slot_keys.topk(k, dim=1, largest=False).indices  # (B, k) distinct valid slots
        return chosen[:, None] * per_group + within

    @torch.no_grad()
    def draw(self, example_ids: torch.Tensor, k: int, generator: torch.Generator | None = None) -> BankNegatives:
        """Draw K negatives for every positive of the global batch, once per micro-step.

        Args:
            example_ids: ``(B_local,)`` ids of this rank's positives; a slot holding the same
                id is never drawn.
            k: negatives per positive (UserError if no group holds enough).
            generator: see ``sample_slots``; must be in the same state on all ranks.

        A collective (every rank, same order): gathers the ids, draws (``sample_slots``), sums
        the drawn normalized vectors of the positives whose group this rank owns, and sends each
        sum to its positive's rank with one ``all_to_all_single``. The returned
        :class:`BankNegatives` scores any number of student passes against this one draw.
        """
        if k < 1:
            raise UserError(f"number of negatives must be at least 1, got {k}")
        if k > int(self.fill):
            raise UserError(f"asked for {k} negatives but the memory bank holds only {int(self.fill)} vectors")
        ids = self._check_ids(example_ids)
        ids_global, sizes = self._gather_ids(ids)
        slots = self.sample_slots(ids_global, k, generator)  # (B, K) global slots
        group_of = slots[:, 0] // self.slots_per_group  # (B,) chosen group per positive
        owner = group_of % self.world_size
        mine = (owner == self.rank).nonzero()[:, 0]  # global rows this rank scores, rank-major
        local_slots = ((slots[mine] // self.slots_per_group) // self.world_size) * self.slots_per_group \
            + slots[mine] % self.slots_per_group
        directions = torch.zeros(mine.numel(), self.num_layers, self.dim, device=self.vectors.device)
        for layer in range(self.num_layers):
            self._direction_sums(layer, local_slots, directions[:, layer])
        offset = sum(sizes[: self.rank])
        if self.world_size > 1:
            directions = self._exchange(directions, mine, owner[offset: offset + sizes[self.rank]], sizes)
        return BankNegatives(self, k, directions.transpose(0, 1), sizes[self.rank])

    def _exchange(self, directions: torch.Tensor, mine: torch.Tensor, my_owners: torch.Tensor,
                  sizes: list[int]) -> torch.Tensor:
        """Send each computed (L, dim) sum to its positive's rank; return this rank's rows' sums
        in local row order, (B_local, L, dim). One all_to_all_single, no autograd."""
        bounds = torch.tensor([sum(sizes[: r + 1]) for r in range(self.world_size)], device=mine.device)
        destination = torch.bucketize(mine, bounds, right=True)  # rank holding each computed row
        send = torch.bincount(destination, minlength=self.world_size).tolist()
        receive = torch.bincount(my_owners, minlength=self.world_size).tolist()
        out = directions.new_empty(sizes[self.rank], *directions.shape[1:])
        dist.all_to_all_single(out, directions.contiguous(), receive, send, group=self.group)
        order = torch.sort(my_owners, stable=True).indices  # received rows: by source rank, then row
        result = torch.empty_like(out)
        result[order.to(out.device)] = out
        return result

    def negative_distance_sums(self, student_vectors: list[torch.Tensor], example_ids: torch.Tensor, k: int,
                               generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], int]:
        """One pass scored against a fresh draw: ``draw(example_ids, k, generator)(student_vectors)``."""
        return self.draw(example_ids, k, generator)(student_vectors)

    @torch.no_grad()
    def _direction_sums(self, layer: int, local_slots: torch.Tensor, out: torch.Tensor) -> None:
        """``out[i] = sum_k vectors[layer, local_slots[i, k]]`` (rows, F), written into fp32 ``out``.

        The rows were normalized in fp32 when stored, so their sum is the sum of the negatives'
        directions; ``embedding_bag`` adds each positive's K rows straight from the storage
        (no gathered copy, no selection matrix). In fp16/bf16 the stored rows carry the
        storage's rounding, which the sum keeps (measured against re-normalizing each row in
        fp32: 1e-6 relative for fp16, 6e-6 for bf16, on sums of K = 15).
        """
        out.copy_(F.embedding_bag(local_slots, self.vectors[layer], mode="sum"))

    # ----------------------------------------------------------------------------- state

    @torch.no_grad()
    def global_contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (L, size, F) storage dtype, ids (size,))`` in global slot order (group-major),
        on every rank. A collective that gathers the whole bank: for tests and tools only."""
        if self.world_size == 1:
            return self.vectors.clone(), self.ids.clone()
        self._check_group()
        parts = [torch.empty_like(self.vectors) for _ in range(self.world_size)]
        dist.all_gather(parts, self.vectors.contiguous(), group=self.group)
        return _assemble(parts, self.num_groups), self.ids.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        groups = state_dict.get(prefix + "groups")
        if prefix + "vectors" in state_dict and groups is None:
            raise UserError(_OLD_LAYOUT)
        if groups is not None and int(groups) != self.num_groups:
            raise UserError(f"memory bank checkpoint has {int(groups)} groups but this run has {self.num_groups}; "
                            f"set --bank_groups {int(groups)}")
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

        Pure function (no process group) that moves whole groups: group g goes to rank
        ``g % new_world_size``. Contents, ids, group pointers and fills and the sampling state
        are preserved; the enqueue cursors restart at 0. Holds the whole bank in memory once.
        """
        if not shards:
            raise UserError("reshard needs at least one memory bank shard")
        world = len(shards)
        for rank, shard in enumerate(shards):
            if "groups" not in shard and "vectors" in shard:
                raise UserError(_OLD_LAYOUT)
            missing = [key for key in _SHARD_KEYS if key not in shard]
            if missing:
                raise UserError(f"memory bank shard {rank} lacks {', '.join(missing)}")
            if shard["shard"].tolist() != [rank, world]:
                raise UserError(f"memory bank shard {rank} of {world} is labelled {shard['shard'].tolist()}")
            for key in _REPLICATED:
                if not torch.equal(shard[key], shards[0][key]):
                    raise UserError(f"memory bank shards disagree on {key}; they are not from one checkpoint")
        groups = int(shards[0]["groups"])
        if new_world_size < 1 or groups % new_world_size != 0:
            raise UserError(f"memory bank of {groups} groups cannot be split over {new_world_size} ranks: "
                            f"the world size must divide --bank_groups")
        full = _assemble([shard["vectors"] for shard in shards], groups)  # (L, size, F)
        per_group = full.shape[1] // groups
        by_group = full.view(full.shape[0], groups, per_group, full.shape[-1])
        out = []
        for rank in range(new_world_size):
            new = {key: shards[0][key].clone() for key in _REPLICATED}
            new["vectors"] = by_group[:, rank::new_world_size].reshape(full.shape[0], -1, full.shape[-1]).clone()
            new["cursor"] = torch.zeros(new_world_size, dtype=torch.int64)
            new["shard"] = torch.tensor([rank, new_world_size], dtype=torch.int64)
            out.append(new)
        return out


_OLD_LAYOUT = ("memory bank checkpoint has the old ungrouped layout (no 'groups' entry) and cannot be converted; "
               "start a new run, or resume with --negatives batch")


def _assemble(parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """Per-rank shards [(L, groups/world * S, F)] * world -> (L, size, F) in global slot order
    (group-major; rank r's local group q is global group q * world + r)."""
    world = len(parts)
    layers, width = parts[0].shape[0], parts[0].shape[-1]
    per_group = parts[0].shape[1] * world // groups
    stacked = torch.stack([p.reshape(layers, groups // world, per_group, width) for p in parts], dim=2)
    return stacked.reshape(layers, groups * per_group, width)  # (L, q, r, S, F): group q * world + r


class BankNegatives:
    """One draw of bank negatives (:meth:`MemoryBank.draw`); call it once per student pass.

    ``negatives(student_vectors) -> (sums, k)``: per layer, ``(B_local,)`` sums over each
    positive's K drawn negatives of g(n_k, z_S) = 1 - cos(n_k, z_S); ``sums[l][i]`` belongs to
    this rank's row i. ``student_vectors`` are this rank's ``(B_local, F)`` projected, pooled
    student vectors per layer (with grad; fp32 maths; zero-padded to the bank's ``dim``).

    Purely local: the draw already brought this rank's rows' direction sums
    D_i = sum_k n_hat_k (negatives carry no gradient), so sum_k cos(z_i, n_k) = z_hat_i . D_i
    and a pass costs O(B_local * L * F), with gradient through z only.

    Gradient convention: rank r's student vectors receive exactly dL_r/dz_r, where L_r is the
    loss rank r builds from its own rows: the same gradient a one-rank run gives those rows.
    Hence with L_r = mean over local rows and DeepSpeed averaging gradients over ranks, the
    update equals a one-rank run on the global batch with loss = mean over all global rows
    (equal local batch sizes). Do not rescale the loss by the world size.
    """

    def __init__(self, bank: MemoryBank, k: int, directions: torch.Tensor, rows: int):
        self.bank, self.k = bank, k
        self.directions = directions  # (L, B_local, dim) sum of the drawn normalized vectors
        self.rows = rows

    def __call__(self, student_vectors: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        if any(z.shape[0] != self.rows for z in student_vectors):
            raise UserError(f"memory bank negatives were drawn for {self.rows} rows but got "
                            f"{[tuple(z.shape) for z in student_vectors]}")
        z = torch.stack([z.float() for z in self.bank.fit(student_vectors)])  # (L, B_local, dim)
        z_hat = F.normalize(z, dim=-1, eps=_NORM_EPS)
        sums = self.k - (z_hat * self.directions.to(z_hat.device)).sum(-1)  # (L, B_local)
        return list(sums.unbind(0)), self.k
