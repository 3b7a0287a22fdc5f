"""Build the general-distillation corpus: text -> sentences -> packed token sequences -> shards.

``prepare_corpus(CorpusConfig(...))`` (CLI: ``pretrain/prepare_corpus.py``); the files it
writes are described in ``corpus_format.py``, the documents and sentences in ``text.py``:

1. Check what a user can get wrong before any work: the inputs exist and are non-empty
   UTF-8, the tokenizer loads and is a fast one, the output directory holds nothing
   made with other settings.
2. Stream documents from the inputs in order and cut the stream into shards of about
   ``chars_per_shard`` characters at document boundaries. The cut depends only on the
   input, so the shards are identical for any number of workers.
3. Each shard goes to one worker process: split paragraphs into sentences, tokenize them
   in batches with the tokenizer's Rust backend, pack whole sentences greedily into
   sequences of at most ``max_seq_length`` tokens *including* the special tokens (the
   stored sequences are exactly what the model sees), and write
   ``shard_XXXXX.tokens.npy`` (flat uint16/uint32) and ``shard_XXXXX.offsets.npy``
   (int64, ``num_sequences + 1``) under temporary names, renamed when complete.
4. After each finished shard the manifest is rewritten atomically with the shard's counts,
   sizes and sha256 checksums. A restarted run keeps every recorded shard whose files
   still match their checksums and redoes the rest.

Choices of ours (the paper is silent):
- A sequence never spans two documents; it may span paragraphs and sections of one
  document (as BERT's pre-training data does).
- A sentence longer than the budget is truncated and fills a sequence alone: that is the
  only text dropped.

Torch-free: spawned workers re-import ``pretrain/prepare_corpus.py`` and with it this module,
so nothing imported here may import torch or transformers at module level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import groupby
from multiprocessing import get_context
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from lrcbert.data.corpus_format import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, file_sha256, shard_file_name,
                                        special_token_ids, token_dtype, tokenizer_identity)
from lrcbert.data.text import (INPUT_FORMATS, SPLITTER_VERSION, check_text_file, iter_documents, iter_hub_documents,
                               load_tokenizer, open_hub_dataset, resolve_format, split_sentences)
from lrcbert.config import flag
from lrcbert.errors import UserError
from lrcbert.files import write_json_atomic

_ENCODE_BATCH = 2048  # sentences per backend encode call


@dataclass
class CorpusConfig:
    """Tokenize a text corpus into memory-mapped shards for general distillation."""

    output_dir: str = flag("directory for the shards and manifest.json")
    tokenizer: str = flag("the teacher's tokenizer directory (any Hugging Face fast tokenizer)")
    input: str = flag("comma-separated local text files, read in this order", "")
    input_format: str = flag("raw / tokens: WikiText (.raw / .tokens); plain: one paragraph per line, blank line "
                             "between documents; auto: by file suffix (.raw, .tokens, else plain)", "auto",
                             choices=INPUT_FORMATS)
    hub: str | None = flag("a `datasets` hub name, e.g. wikimedia/wikipedia (streamed, `text` column; "
                           "needs internet); instead of --input", None)
    hub_config: str | None = flag("hub dataset config, e.g. 20231101.en", None)
    hub_split: str = flag("hub dataset split", "train")
    max_seq_length: int = flag("tokens per sequence, [CLS] and [SEP] included", 128)
    num_workers: int = flag("tokenizer processes (1: tokenize in this process)", 1)
    chars_per_shard: int = flag("characters of text per shard (the unit of work, memory and restart)", 16_000_000)
    max_documents: int = flag("stop after this many documents (0: all)", 0)
    overwrite: bool = flag("replace a corpus in --output_dir made with other settings", False)
    progress: bool = flag("show a progress bar", True)


# ----------------------------------------------------------------------------- packing


def pack_document(sentence_ids: Iterable[list[int]], budget: int) -> Iterator[list[int]]:
    """Greedy packing of one document's sentences (token ids, no special tokens) into
    sequences of at most ``budget`` tokens. A sentence longer than ``budget`` is truncated
    to it and forms a sequence alone; empty sentences are skipped."""
    current: list[int] = []
    for ids in sentence_ids:
        if not ids:
            continue
        if len(ids) > budget:
            if current:
                yield current
            yield ids[:budget]
            current = []
        elif len(current) + len(ids) > budget:
            yield current
            current = list(ids)
        else:
            current.extend(ids)
    if current:
        yield current


# ----------------------------------------------------------------------------- shard workers

_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    """Per process: the backend tokenizer rebuilt from its JSON (no transformers, no torch)."""
    if settings["single_threaded"]:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    from tokenizers import Tokenizer

    _WORKER.clear()
    _WORKER.update(settings, backend=Tokenizer.from_str(settings["tokenizer_json"]))


def _encoded_sentences(docs: list[list[str]], backend) -> Iterator[tuple[int, list[int]]]:
    """(document number, token ids) for every sentence, encoded in batches."""
    numbers: list[int] = []
    texts: list[str] = []
    for number, doc in enumerate(docs):
        for paragraph in doc:
            for sentence in split_sentences(paragraph):
                numbers.append(number)
                texts.append(sentence)
                if len(texts) >= _ENCODE_BATCH:
                    yield from zip(numbers, (e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)))
                    numbers, texts = [], []
    if texts:
        yield from zip(numbers, (e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)))


def _save_npy(path: str, array: np.ndarray) -> dict:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array, allow_pickle=False)
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def _run_shard(index: int, docs: list[list[str]]) -> dict:
    """Tokenize, pack and write one shard; returns its manifest record."""
    prefix, suffix = _WORKER["prefix_ids"], _WORKER["suffix_ids"]
    budget = _WORKER["max_seq_length"] - len(prefix) - len(suffix)
    dtype = np.dtype(_WORKER["dtype"])
    stats = {"num_sentences": 0, "num_truncated_sentences": 0, "num_dropped_tokens": 0}

    def counted(group):
        for _, ids in group:
            stats["num_sentences"] += 1
            if len(ids) > budget:
                stats["num_truncated_sentences"] += 1
                stats["num_dropped_tokens"] += len(ids) - budget
            yield ids

    parts, lengths, flat = [], [], []
    for _, group in groupby(_encoded_sentences(docs, _WORKER["backend"]), key=lambda item: item[0]):
        for sequence in pack_document(counted(group), budget):
            flat.extend(prefix)
            flat.extend(sequence)
            flat.extend(suffix)
            lengths.append(len(prefix) + len(sequence) + len(suffix))
            if len(flat) >= 1 << 20:
                parts.append(np.asarray(flat, dtype=dtype))
                flat = []
    parts.append(np.asarray(flat, dtype=dtype))
    tokens = np.concatenate(parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    record = {"index": index, "num_documents": len(docs), "num_sequences": len(lengths),
              "num_tokens": int(tokens.size), **stats, "files": {}}
    out_dir = _WORKER["output_dir"]
    for kind, array in (("tokens", tokens), ("offsets", offsets)):
        name = shard_file_name(index, kind)
        record["files"][kind] = {"name": name, **_save_npy(os.path.join(out_dir, f"{name}.tmp"), array)}
    for kind in ("tokens", "offsets"):  # both complete before either gets its final name
        name = record["files"][kind]["name"]
        os.replace(os.path.join(out_dir, f"{name}.tmp"), os.path.join(out_dir, name))
    return record


# ----------------------------------------------------------------------------- the pipeline


@dataclass
class PrepareReport:
    """What one prepare_corpus call did."""

    manifest: dict
    shards_written: int
    shards_kept: int
    tokens_written: int
    elapsed_s: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        m = self.manifest
        return (f"{m['num_sequences']:,} sequences, {m['num_tokens']:,} tokens in {m['num_shards']} shards "
                f"({self.shards_written} written, {self.shards_kept} kept from an earlier run); "
                f"{m['num_truncated_sentences']:,} over-long sentences truncated "
                f"({m['num_dropped_tokens']:,} tokens dropped); {self.elapsed_s:.1f} s, "
                f"{self.tokens_per_second:,.0f} tokens/s")


_OUTPUT_OPTIONS = ("input_format", "chars_per_shard", "max_documents", "hub", "hub_config", "hub_split")


def _fingerprint(manifest: dict) -> dict:
    """The settings that determine the shards' bytes (a restart must match them)."""
    tokenizer = {k: v for k, v in manifest["tokenizer"].items() if k != "name_or_path"}
    options = {k: manifest["options"].get(k) for k in _OUTPUT_OPTIONS}
    return {"format_version": manifest["format_version"], "splitter": manifest["splitter"],
            "max_seq_length": manifest["max_seq_length"], "dtype": manifest["dtype"],
            "tokenizer": tokenizer, "special_tokens": manifest["special_tokens"],
            "inputs": manifest["inputs"], "options": options}


def _check_config(config: CorpusConfig) -> list[dict]:
    """Validate flags and inputs; returns the input records. All before any work."""
    paths = [p.strip() for p in config.input.split(",") if p.strip()]
    if bool(paths) == bool(config.hub):
        raise UserError("give exactly one of --input FILES or --hub NAME")
    if config.input_format not in INPUT_FORMATS:
        raise UserError(f"--input_format must be one of {', '.join(INPUT_FORMATS)}, got {config.input_format!r}")
    for name in ("max_seq_length", "num_workers", "chars_per_shard"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.max_documents < 0:
        raise UserError(f"--max_documents must be >= 0, got {config.max_documents}")
    if config.hub:
        return [{"hub": config.hub, "config": config.hub_config, "split": config.hub_split}]
    inputs = []
    for path in paths:
        check_text_file(path)
        inputs.append({"path": os.path.abspath(path), "format": resolve_format(path, config.input_format),
                       "bytes": os.path.getsize(path)})
    return inputs


def _kept_shards(output_dir: str, manifest: dict, overwrite: bool) -> dict[int, dict]:
    """Records of finished shards from an earlier run with the same settings whose files
    still match their checksums. A corpus made with other settings is an error unless
    ``overwrite`` (then its files are removed)."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    if not os.path.exists(path):
        return {}
    for name in os.listdir(output_dir):  # left by an interrupted write
        if re.fullmatch(r"shard_\d+\.(tokens|offsets)\.npy\.tmp", name):
            os.remove(os.path.join(output_dir, name))
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        old_print = _fingerprint(old)
    except (ValueError, KeyError, TypeError):
        old, old_print = None, None
    new_print = _fingerprint(manifest)
    if old_print != new_print:
        if not overwrite:
            what = "an unreadable manifest" if old_print is None else "different " + ", ".join(
                k for k in new_print if old_print.get(k) != new_print[k])
            raise UserError(f"{output_dir} holds a corpus with {what}; use another --output_dir or --overwrite")
        for name in os.listdir(output_dir):
            if name == MANIFEST_NAME or re.fullmatch(r"shard_\d+\.(tokens|offsets)\.npy(\.tmp)?", name):
                os.remove(os.path.join(output_dir, name))
        return {}
    kept = {}
    for record in old.get("shards", []):
        files = [os.path.join(output_dir, f["name"]) for f in record["files"].values()]
        if all(os.path.isfile(p) and os.path.getsize(p) == f["bytes"] and file_sha256(p) == f["sha256"]
               for p, f in zip(files, record["files"].values())):
            kept[record["index"]] = record
    return kept


def _shard_stream(inputs: list[dict], config: CorpusConfig, unk_token: str | None, hub_stream):
    """(index, documents) in input order, cut every ``chars_per_shard`` characters."""

    def documents():
        count = 0
        for source in inputs:
            if "hub" in source:
                docs = iter_hub_documents(hub_stream, config.chars_per_shard)
            else:
                docs = iter_documents(source["path"], source["format"], unk_token, config.chars_per_shard)
            for doc in docs:
                if config.max_documents and count >= config.max_documents:
                    return
                count += 1
                yield doc

    index, shard, chars = 0, [], 0
    for doc in documents():
        shard.append(doc)
        chars += sum(map(len, doc))
        if chars >= config.chars_per_shard:
            yield index, shard
            index, shard, chars = index + 1, [], 0
    if shard:
        yield index, shard


def prepare_corpus(config: CorpusConfig) -> PrepareReport:
    """Build (or finish) the corpus in ``config.output_dir``; see the module docstring."""
    inputs = _check_config(config)
    tokenizer = load_tokenizer(config.tokenizer, require_fast=True)
    specials = special_token_ids(tokenizer)
    if config.max_seq_length <= len(specials["prefix_ids"]) + len(specials["suffix_ids"]):
        raise UserError(f"--max_seq_length {config.max_seq_length} leaves no room next to the special tokens")
    identity = tokenizer_identity(tokenizer)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "complete": False,
                "splitter": SPLITTER_VERSION, "max_seq_length": config.max_seq_length,
                "dtype": token_dtype(identity["vocab_size"]), "tokenizer": identity, "special_tokens": specials,
                "inputs": inputs, "options": dataclasses.asdict(config)}
    records = _kept_shards(config.output_dir, manifest, config.overwrite)
    hub_stream = open_hub_dataset(config.hub, config.hub_config, config.hub_split) if config.hub else None
    os.makedirs(config.output_dir, exist_ok=True)
    manifest_path = os.path.join(config.output_dir, MANIFEST_NAME)

    def save(complete: bool) -> None:
        manifest["complete"] = complete
        manifest["shards"] = [records[i] for i in sorted(records)]
        write_json_atomic(manifest_path, manifest)

    save(False)
    kept = set(records)
    settings = {"tokenizer_json": tokenizer.backend_tokenizer.to_str(), "prefix_ids": specials["prefix_ids"],
                "suffix_ids": specials["suffix_ids"], "max_seq_length": config.max_seq_length,
                "dtype": manifest["dtype"], "output_dir": config.output_dir,
                "single_threaded": config.num_workers > 1}
    bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not config.progress)
    written = {"shards": 0, "tokens": 0}
    num_shards = 0

    def finished(record: dict) -> None:
        records[record["index"]] = record
        save(False)
        written["shards"] += 1
        written["tokens"] += record["num_tokens"]
        bar.update(record["num_tokens"])
        bar.set_postfix(shards=len(records))

    start = time.perf_counter()
    shards = _shard_stream(inputs, config, tokenizer.unk_token, hub_stream)
    try:
        if config.num_workers == 1:
            _init_worker(settings)
            for index, docs in shards:
                num_shards = index + 1
                if index not in kept:
                    finished(_run_shard(index, docs))
        else:
            with ProcessPoolExecutor(config.num_workers, mp_context=get_context("spawn"),
                                     initializer=_init_worker, initargs=(settings,)) as pool:
                pending = set()
                try:
                    for index, docs in shards:
                        num_shards = index + 1
                        if index in kept:
                            continue
                        pending.add(pool.submit(_run_shard, index, docs))
                        while len(pending) >= 2 * config.num_workers:  # bounds the text held in memory
                            done, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for future in done:
                                finished(future.result())
                    while pending:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            finished(future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - start

    for index in [i for i in records if i >= num_shards]:
        del records[index]  # cannot happen with matching settings; never leave them listed
    totals = {key: sum(r[key] for r in records.values()) for key in
              ("num_documents", "num_sequences", "num_tokens", "num_sentences",
               "num_truncated_sentences", "num_dropped_tokens")}
    if not totals["num_sequences"]:
        raise UserError("the inputs hold no text to tokenize (only headings or blank lines)")
    manifest.update(num_shards=num_shards, **totals)
    save(True)
    return PrepareReport(manifest, written["shards"], len(kept & set(records)), written["tokens"], elapsed)
