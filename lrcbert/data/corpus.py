"""Reading the general-distillation corpus: memory-mapped shards, checked against the manifest,
and this rank's micro-batches of them.

The files are described in ``corpus_format.py`` (this module does not import the builder,
``corpus_build.py``). Reading for training::

    data = CorpusDataset(args.corpus)                 # sizes checked; checksums on request
    check_compatible(data.manifest, tokenizer, args.max_seq_length)
    batches = RankBatches(data, micro_batch_size, rank, world_size, seed)
    batches.load_state_dict(checkpoint["data"])       # on resume
    for batch in batches: ...                          # the rest of the current epoch
"""

from __future__ import annotations

import os

import numpy as np
import torch

from lrcbert.data.batches import TrainOrder
from lrcbert.data.corpus_format import file_sha256, read_manifest, special_token_ids, tokenizer_identity
from lrcbert.errors import UserError


class CorpusDataset:
    """Sequences of a corpus directory, read through memory maps (nothing loaded up front).

    ``dataset[i]`` is a 1-D numpy array of token ids (special tokens included). Opening
    checks every shard file's size against the manifest (missing or truncated shard ->
    UserError naming it with the expected and actual size) and the array shapes;
    ``verify_checksums=True`` also checks sha256 (reads every byte: slow on big corpora).
    """

    def __init__(self, path: str, verify_checksums: bool = False):
        self.path = str(path)
        self.manifest = read_manifest(self.path)
        self.max_seq_length: int = self.manifest["max_seq_length"]
        self.special_tokens: dict = self.manifest["special_tokens"]
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for record in self.manifest["shards"]:
            for info in record["files"].values():
                self._check_file(info, verify_checksums)
            tokens, offsets = self._open(record)
            self._tokens.append(tokens)
            self._offsets.append(offsets)
        counts = [record["num_sequences"] for record in self.manifest["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # first global index per shard

    def _check_file(self, info: dict, verify_checksums: bool) -> None:
        file_path = os.path.join(self.path, info["name"])
        if not os.path.isfile(file_path):
            raise UserError(f"corpus {self.path}: shard file {info['name']} is missing "
                            f"(expected {info['bytes']} bytes)")
        actual = os.path.getsize(file_path)
        if actual != info["bytes"]:
            raise UserError(f"corpus {self.path}: shard file {info['name']} has {actual} bytes, expected "
                            f"{info['bytes']} (truncated or changed; rebuild that shard with prepare_corpus.py)")
        if verify_checksums and file_sha256(file_path) != info["sha256"]:
            raise UserError(f"corpus {self.path}: shard file {info['name']} fails its sha256 check "
                            "(corrupted; rebuild that shard with prepare_corpus.py)")

    def _open(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        files = record["files"]
        name = files["tokens"]["name"]
        dtype = np.dtype(self.manifest["dtype"])
        try:
            offsets = np.load(os.path.join(self.path, files["offsets"]["name"]), mmap_mode="r")
            tokens = (np.load(os.path.join(self.path, name), mmap_mode="r") if record["num_tokens"]
                      else np.zeros(0, dtype))  # numpy cannot memory-map zero bytes
        except (ValueError, OSError) as exc:  # not an .npy file (garbage of the right size), unreadable
            raise UserError(f"corpus {self.path}: cannot read shard {name}: {exc}") from None
        n = record["num_sequences"]
        if (tokens.shape != (record["num_tokens"],) or tokens.dtype != dtype or offsets.shape != (n + 1,)
                or offsets[0] != 0 or offsets[n] != record["num_tokens"]):
            raise UserError(f"corpus {self.path}: shard {name} does not match its manifest record "
                            "(shape, dtype or offsets); rebuild it with prepare_corpus.py")
        return tokens, offsets

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for a corpus of {len(self)}")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[shard])
        offsets = self._offsets[shard]
        return self._tokens[shard][offsets[local]:offsets[local + 1]]


def check_compatible(manifest, tokenizer, max_seq_length: int) -> None:
    """UserError naming the mismatch when the corpus (a manifest dict or a CorpusDataset) was
    made with another tokenizer (vocabulary size or contents, special token ids) or another
    ``max_seq_length`` than this run uses."""
    manifest = getattr(manifest, "manifest", manifest)
    if manifest["max_seq_length"] != max_seq_length:
        raise UserError(f"the corpus was built with max_seq_length {manifest['max_seq_length']}, this run uses "
                        f"{max_seq_length}; rebuild it with --max_seq_length {max_seq_length}")
    made, ours = manifest["tokenizer"], tokenizer_identity(tokenizer)
    for key in ("vocab_size", "vocab_sha256"):
        if made[key] != ours[key]:
            raise UserError(f"the corpus was tokenized with another tokenizer ({key}: corpus "
                            f"{made['name_or_path']} {made['class']} {made[key]}, this run "
                            f"{ours['name_or_path']} {ours['class']} {ours[key]}); "
                            "rebuild it with this run's tokenizer")
    specials = special_token_ids(tokenizer)
    for key, value in specials.items():
        if manifest["special_tokens"].get(key) != value:
            raise UserError(f"the corpus uses {key} {manifest['special_tokens'].get(key)}, this run's tokenizer "
                            f"{value}; rebuild the corpus with this run's tokenizer")


class RankBatches:
    """This rank's micro-batches of a CorpusDataset for data-parallel training.

    Epoch e shuffles with a generator seeded ``seed + e`` (the same ``TrainOrder`` as the
    task stage); a global batch is ``micro_batch_size * world_size`` consecutive sequences
    of the permutation and rank r reads its r-th slice, so ranks never overlap. Every rank
    gets ``len(self)`` batches per epoch (the remainder is dropped: no rank waits at a
    collective for one that ran out). Iterating yields the rest of the current epoch, then
    moves the position to the next epoch. Batches are dicts of int64 tensors padded to the
    longest row: ``input_ids``, ``attention_mask``, ``token_type_ids`` (zeros), all (B, T),
    and ``rows`` (B,), the corpus indices.

    ``state_dict()`` is the position of the *next* batch: ``batch_index`` counts global
    batches of this epoch already handed out, so a resumed run continues exactly there.
    """

    def __init__(self, dataset: CorpusDataset, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 pad_id: int | None = None):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"bad data-parallel layout: micro_batch_size {micro_batch_size}, rank {rank}, "
                            f"world_size {world_size}")
        global_batch = micro_batch_size * world_size
        if len(dataset) < global_batch:
            raise UserError(f"corpus {getattr(dataset, 'path', '')} has {len(dataset)} sequences, fewer than one "
                            f"global batch ({micro_batch_size} x {world_size} ranks)")
        if pad_id is None:
            pad_id = getattr(dataset, "special_tokens", {}).get("pad_token_id")
        self.dataset = dataset
        self.pad_id = 0 if pad_id is None else int(pad_id)  # padding is masked out: any id works
        self.seed = seed
        self.order = TrainOrder(len(dataset), micro_batch_size, world_size, rank, 1, seed)
        self.epoch = 0
        self.batch_index = 0

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return self.order.micro_batches_per_epoch

    def __iter__(self):
        while self.batch_index < len(self):
            rows = self.order.rows(self.epoch * len(self) + self.batch_index)
            self.batch_index += 1  # advanced before the yield: a checkpoint taken now resumes after it
            yield self.collate(rows)
        self.epoch += 1
        self.batch_index = 0

    def collate(self, rows) -> dict[str, torch.Tensor]:
        sequences = [self.dataset[int(r)] for r in rows]
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
        for i, sequence in enumerate(sequences):
            input_ids[i, :len(sequence)] = torch.from_numpy(sequence.astype(np.int64))
            attention_mask[i, :len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids), "rows": torch.as_tensor(np.asarray(rows, np.int64))}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the data position was saved with seed {state['seed']}, this run uses {self.seed}; "
                            "resume with the same --seed")
        if not 0 <= state["batch_index"] <= len(self) or state["epoch"] < 0:
            raise UserError(f"data position {state} does not fit this corpus and layout ({len(self)} batches "
                            "per epoch); resume with the same corpus, micro batch size and world size")
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
