"""Atomic file writes: a reader sees the old content or the new one, never half of it.

Torch-free on purpose: the corpus builder's worker processes import it.
"""

from __future__ import annotations

import json
import os


def write_atomic(path: str, text: str, *, sync: bool = True) -> None:
    """Write ``text`` to ``path.tmp`` and rename it over ``path``; ``sync`` flushes it to disk
    first (checkpoint pointers, manifests), which heartbeat files written every second skip."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, data, *, indent: int = 1, sync: bool = True) -> None:
    """``data`` as JSON (one trailing newline) through :func:`write_atomic`."""
    write_atomic(path, json.dumps(data, indent=indent) + "\n", sync=sync)
