"""The general-distillation corpus on disk: what its builder and its reader share.

A corpus directory holds::

    manifest.json              format version, tokenizer identity, max_seq_length, special ids,
                               inputs and options, counts, per-shard sizes and sha256
    shard_00000.tokens.npy     flat uint16 (uint32 for vocabularies over 65,536) token ids
    shard_00000.offsets.npy    int64, num_sequences + 1; sequence i is tokens[o[i]:o[i + 1]]

Every stored sequence is what the model sees: special tokens included ([CLS] ... [SEP]),
at most ``max_seq_length`` tokens. ``corpus_build.py`` writes it, ``corpus.py`` reads it;
neither imports the other. Torch-free: the builder's worker processes import this module.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from lrcbert.errors import UserError

FORMAT_NAME = "lrcbert-corpus"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def shard_file_name(index: int, kind: str) -> str:
    """``kind`` is ``tokens`` or ``offsets``."""
    return f"shard_{index:05d}.{kind}.npy"


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every token id."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """Name, class, vocab size and hashes. ``vocab_sha256`` hashes the (token, id) pairs in id
    order (stable across library versions); ``tokenizer_json_sha256`` hashes the canonical
    serialized tokenizer (normalizer, pre-tokenizer, model) as this tokenizers version writes it."""
    ordered = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    vocab_bytes = json.dumps(ordered, ensure_ascii=False).encode("utf-8")
    serialized = json.loads(tokenizer.backend_tokenizer.to_str())  # key order varies run to run
    canonical = json.dumps(serialized, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "class": type(tokenizer).__name__,
        "vocab_size": max(len(tokenizer), ordered[-1][1] + 1),
        "vocab_sha256": hashlib.sha256(vocab_bytes).hexdigest(),
        "tokenizer_json_sha256": hashlib.sha256(canonical).hexdigest(),
    }


def special_token_ids(tokenizer) -> dict:
    """The ids the tokenizer adds around one sequence (``prefix_ids`` / ``suffix_ids``, e.g.
    [CLS] / [SEP]) and its pad, cls, sep, unk and mask ids (None where it has none)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            break
    else:
        raise UserError(f"cannot tell where tokenizer {tokenizer.name_or_path} puts its special tokens")
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("pad", "cls", "sep", "unk", "mask")}
    return {"prefix_ids": full[:start], "suffix_ids": full[start + len(plain):],
            **{f"{name}_token_id": value for name, value in ids.items()}}


def read_manifest(path: str) -> dict:
    """The manifest of the finished corpus directory ``path``, or UserError (missing,
    unreadable, another format or version, or an unfinished build)."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise UserError(f"no {MANIFEST_NAME} in corpus directory {path}; build it with pretrain/prepare_corpus.py")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {manifest_path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{manifest_path} is not an lrcbert corpus manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{manifest_path} has format version {manifest.get('format_version')}, this code reads "
                        f"version {FORMAT_VERSION}; rebuild the corpus")
    if not manifest.get("complete"):
        raise UserError(f"corpus {path} is incomplete (an interrupted build); rerun pretrain/prepare_corpus.py "
                        "with the same flags to finish it")
    return manifest
