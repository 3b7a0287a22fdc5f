"""Counting the bytes of torch.distributed's collectives, per phase of a step, on each rank.

Used by ``bench/dist_memory.py`` (``bench/memory.py``'s ranks) and by
``tests/dist_scripts/bank_equivalence.py``. Call :func:`install_counters` before
``deepspeed`` is imported or the process group exists (DeepSpeed looks some collectives up
once, at start), then set ``TAG[0]`` to the phase being measured; calls made while it is
``None`` are not counted.

Per phase and collective, ``COUNTS[tag][op]`` holds the number of calls and, split by kind
(``int``: ids and sizes; ``float``: vectors, gradients, parameters), the bytes this rank
hands to the collective (``sent``: its input) and the bytes the collective hands this rank
(``received``: its output; an all_gather's whole gathered list, an all_to_all_single's output
including this rank's own part, a reduce-scatter's shard).
"""

from __future__ import annotations

import torch

COUNTS: dict[str, dict[str, dict[str, int]]] = {}
TAG: list[str | None] = [None]

# per collective: (keyword, position) of the tensor(s) this rank hands in, and of those it gets back
_SIDES = {
    "all_reduce": (("tensor", 0), ("tensor", 0)),
    "broadcast": (("tensor", 0), ("tensor", 0)),
    "reduce": (("tensor", 0), ("tensor", 0)),
    "all_gather": (("tensor", 1), ("tensor_list", 0)),
    "all_gather_into_tensor": (("input_tensor", 1), ("output_tensor", 0)),
    "reduce_scatter": (("input_list", 1), ("output", 0)),
    "reduce_scatter_tensor": (("input", 1), ("output", 0)),
    "all_to_all": (("input_tensor_list", 1), ("output_tensor_list", 0)),
    "all_to_all_single": (("input", 1), ("output", 0)),
    "scatter": (("tensor", 0), ("tensor", 0)),  # gloo's all_to_all (list form) is W scatters
}
# the *payload* of BENCHMARKS.md section 4: what a collective hands each rank, except that a
# reduce-scatter's (and a list all_to_all's) is the whole input every rank contributes
_PAYLOAD_IS_INPUT = {"reduce_scatter", "reduce_scatter_tensor", "all_to_all"}


def nbytes(x) -> int:
    """Bytes of a tensor or of a (nested) list of tensors; 0 for anything else."""
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(nbytes(t) for t in x)
    return 0


def _kind(x) -> str:
    while isinstance(x, (list, tuple)) and x:
        x = x[0]
    return "float" if torch.is_tensor(x) and x.is_floating_point() else "int"


def _arg(args: tuple, kwargs: dict, key: str, pos: int):
    if key in kwargs:
        return kwargs[key]
    return args[pos] if pos < len(args) else None


def _record(op: str, args: tuple, kwargs: dict) -> None:
    (sent_key, sent_pos), (got_key, got_pos) = _SIDES[op]
    sent, got = _arg(args, kwargs, sent_key, sent_pos), _arg(args, kwargs, got_key, got_pos)
    kind = _kind(got if got is not None else sent)
    entry = COUNTS.setdefault(TAG[0], {}).setdefault(op, {})
    entry["calls"] = entry.get("calls", 0) + 1
    entry[f"{kind}_sent"] = entry.get(f"{kind}_sent", 0) + nbytes(sent)
    entry[f"{kind}_received"] = entry.get(f"{kind}_received", 0) + nbytes(got)


def install_counters() -> None:
    """Wrap every collective of ``torch.distributed`` this module knows (once per process)."""
    import torch.distributed as dist

    for op in _SIDES:
        real = getattr(dist, op, None)
        if real is None or getattr(real, "_counted", False):
            continue

        def wrapper(*args, _op=op, _real=real, **kwargs):
            if TAG[0] is not None:
                _record(_op, args, kwargs)
            return _real(*args, **kwargs)

        wrapper._counted = True
        setattr(dist, op, wrapper)


def by_kind(ops: dict[str, dict[str, int]]) -> dict[str, int]:
    """One phase's counts summed over its collectives: calls, int/float sent/received."""
    out: dict[str, int] = {}
    for entry in ops.values():
        for key, value in entry.items():
            out[key] = out.get(key, 0) + value
    return out


def received(ops: dict[str, dict[str, int]]) -> int:
    """Bytes the phase's collectives handed this rank (ints and floats)."""
    total = by_kind(ops)
    return total.get("int_received", 0) + total.get("float_received", 0)


def payload(ops: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per collective, the payload of section 4 (received bytes; a reduce-scatter's input)."""
    side = lambda op: "sent" if op in _PAYLOAD_IS_INPUT else "received"  # noqa: E731
    return {op: entry.get(f"int_{side(op)}", 0) + entry.get(f"float_{side(op)}", 0) for op, entry in ops.items()}
