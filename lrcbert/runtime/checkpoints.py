"""Checkpoint layout on disk, independent of DeepSpeed's own files (no deepspeed import).

    OUTPUT_DIR/checkpoints/
        latest                   the tag of the newest complete checkpoint (written atomically)
        step-0000500/            DeepSpeed's files (weights, optimizer partitions, scheduler,
                                 loss scaler, client state), plus ours:
            rng_rankNNNNN.pt     every rank's RNG states
            state_rankNNNNN.pt   per-rank state of the recipe (e.g. its memory-bank shard)
            meta.json            written last: step, world size, ZeRO stage, parameter shapes,
                                 every file's size
        .tmp-step-0000600/       a save in progress (renamed to step-0000600/ when complete)
        step-0000500.universal/  DeepSpeed's universal checkpoint of step-0000500, made once by a resume at
                                 another world size under ZeRO (the original stays untouched); pruned with it

A crash mid-save leaves the previous checkpoint and ``latest`` intact; ``verify_checkpoint``
finds a damaged one (a file missing or of another size) before DeepSpeed reads it.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from lrcbert.errors import UserError
from lrcbert.files import write_atomic, write_json_atomic
from lrcbert.runtime import hooks

LATEST = "latest"
META = "meta.json"  # written into every checkpoint last: world size, ZeRO stage, batch, parameter shapes, file sizes
UNIVERSAL = ".universal"  # suffix of a checkpoint's universal conversion (a sibling folder)
CHECKPOINT_NAME = re.compile(r"step-\d+")


def step_tag(step: int) -> str:
    return f"step-{step:07d}"


def rng_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"rng_rank{rank:05d}.pt")


def rank_state_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"state_rank{rank:05d}.pt")


def rank_state_files(folder: str) -> list[str]:
    """Every rank's ``state_rankNNNNN.pt`` of a checkpoint, in rank order."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("state_rank"))


def write_meta(folder: str, step: int, world: int, zero_stage: int, parameters: dict[str, list[int]],
               batch: dict[str, int] | None = None) -> None:
    """The last file of a checkpoint (rank 0, after every rank wrote its files). ``batch`` holds
    ``micro_batch_size``, ``gradient_accumulation_steps`` and ``global_batch_size``: a resume at
    another world size keeps the global batch."""
    meta = {"step": step, "world_size": world, "zero_stage": zero_stage, **(batch or {}), "parameters": parameters,
            "files": file_sizes(folder)}
    write_json_atomic(os.path.join(folder, META), meta)


def publish(save_dir: str, tmp: str, tag: str, step: int, keep_last: int) -> None:
    """Rank 0, once ``tmp`` is complete: rename it to ``tag``, point ``latest`` at it, prune."""
    hooks.pause_before_rename(step, tmp)
    final = os.path.join(save_dir, tag)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    try:
        write_atomic(os.path.join(save_dir, LATEST), tag)  # atomic: the old pointer or the new one
    except OSError as exc:
        raise save_error(exc, save_dir, tag) from None
    prune(save_dir, keep_last)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def save_error(exc: BaseException, save_dir: str, tag: str) -> UserError:
    """A failed save as one line; a full disk is named as such (torch.save reports ENOSPC as a
    RuntimeError without errno, e.g. "unexpected pos", so the space left decides then)."""
    previous = latest_tag(save_dir)
    kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        free = -1
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc) or 0 <= free < 16 * 2**20
    if full:
        return UserError(f"disk full while saving checkpoint {tag} in {save_dir} ({free / 2**20:.0f} MiB free); "
                         f"{kept}; free some space and continue with --resume")
    return UserError(f"cannot write checkpoint {tag} in {save_dir} ({first_line(exc)}); {kept}")


def verify_checkpoint(folder: str) -> dict | None:
    """The checkpoint's ``meta.json`` after checking every recorded file is there with its size;
    UserError naming the first damaged file. None for checkpoints written before meta.json existed."""
    path = os.path.join(folder, META)
    if not os.path.isfile(path):
        if any(name.startswith("rng_rank") for name in os.listdir(folder)):
            return None  # an older checkpoint: DeepSpeed's own loading is the only check
        raise UserError(f"--resume: checkpoint {folder} is incomplete (no {META}); point the 'latest' file "
                        "to an earlier step-* or start afresh with --overwrite_output_dir")
    try:
        with open(path) as f:
            meta = json.load(f)
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume: {path} is unreadable ({first_line(exc)})") from None
    for name, size in sorted(files.items()):
        file = os.path.join(folder, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            what = "is missing" if actual is None else f"has {actual} bytes"
            raise UserError(f"--resume: checkpoint {folder} is damaged: {name} {what}, {META} recorded {size} "
                            "bytes; point the 'latest' file to an earlier step-* or start afresh")
    return meta


def check_same_model(folder: str, saved: dict, current: dict) -> None:
    if saved == current:
        return
    for name in sorted(set(saved) | set(current)):
        there, here = saved.get(name), current.get(name)
        if there != here:
            raise UserError(f"--resume: checkpoint {folder} holds another model: parameter {name} is "
                            f"{there or 'absent'} there and {here or 'absent'} here (other student, teacher, "
                            "task or layer-map flags?)")


@dataclass(frozen=True)
class ElasticResume:
    """A resume at another world size than the checkpoint's: the batch layout that keeps its global batch."""

    folder: str
    saved_world: int
    world: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    given: tuple[int, int]  # micro batch and accumulation from the flags
    universal: bool  # ZeRO-partitioned optimizer state: loaded through DeepSpeed's universal checkpoint
    zero_stage: int

    def configure(self, ds_config: dict) -> None:
        """Tell DeepSpeed to load the universal conversion when the optimizer state is partitioned."""
        if self.universal:
            ds_config["checkpoint"] = dict(ds_config.get("checkpoint", {}), load_universal=True)

    def describe(self) -> str:
        """The one start-up line of an elastic resume."""
        micro, accumulation = self.given
        kept = ("as given" if (micro, accumulation) == (self.micro_batch_size, self.gradient_accumulation_steps)
                else f"flags gave {micro} x {accumulation}")
        how = (f"ZeRO-{self.zero_stage} optimizer state through the universal checkpoint "
               f"{os.path.basename(self.folder)}{UNIVERSAL}" if self.universal else "optimizer state as saved")
        global_batch = self.micro_batch_size * self.gradient_accumulation_steps * self.world
        return (f"elastic resume: {os.path.basename(self.folder)} saved by {self.saved_world} ranks, resumed by "
                f"{self.world}; global batch {global_batch} kept as micro batch {self.micro_batch_size} x "
                f"accumulation {self.gradient_accumulation_steps} x {self.world} ranks ({kept}); {how}")


def is_partitioned(folder: str) -> bool:
    """Whether the checkpoint holds ZeRO-partitioned optimizer state (one file per data-parallel rank)."""
    return any("zero_pp_rank_" in name for name in os.listdir(folder))


def elastic_batch(global_batch: int, saved_accumulation: int, world: int, micro: int,
                  accumulation: int) -> tuple[int, int]:
    """Micro batch and accumulation at ``world`` ranks that keep ``global_batch``.

    Flags that already give it are used as given. Otherwise the saved accumulation is kept and
    the micro batch scaled, so the global micro-batch (micro x world: what batch negatives are
    drawn from, and the unit of the data order) is the saved one; where that does not divide,
    the largest micro batch up to the flag's that divides the per-rank share, with the
    accumulation filling the rest.
    """
    if micro * accumulation * world == global_batch:
        return micro, accumulation
    if global_batch % world:
        raise UserError(f"--resume: the checkpoint's global batch {global_batch} cannot be split over {world} "
                        f"ranks; resume with a world size that divides {global_batch}")
    per_rank = global_batch // world
    if per_rank % saved_accumulation == 0:
        return per_rank // saved_accumulation, saved_accumulation
    best = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return best, per_rank // best


def check_resume(ckpt_dir: str, world: int, micro: int, accumulation: int) -> ElasticResume | None:
    """Before any process group: the checkpoint to resume is complete; None at the world size
    that saved it, else how the resume at ``world`` keeps the saved global batch.

    ZeRO-partitioned optimizer state (ZeRO-1/2/3, bf16's optimizer) is converted to DeepSpeed's
    universal checkpoint on load (``Engine.load``); the recipes convert their data position and
    re-shard the memory bank themselves.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    folder = os.path.join(ckpt_dir, tag)
    meta = verify_checkpoint(folder)
    saved = meta["world_size"] if meta is not None else checkpoint_world_size(ckpt_dir)
    if saved == world:
        return None
    if meta is None or "global_batch_size" not in meta:
        raise UserError(f"--resume: {folder} was saved by {saved} ranks before checkpoints recorded their global "
                        f"batch; resume it with {saved} ranks")
    micro_now, accumulation_now = elastic_batch(meta["global_batch_size"], meta["gradient_accumulation_steps"],
                                                world, micro, accumulation)
    return ElasticResume(folder, saved, world, micro_now, accumulation_now, (micro, accumulation),
                         is_partitioned(folder), int(meta.get("zero_stage", 0)))


def resume_layout(args, world: int, rank: int) -> ElasticResume | None:
    """With --resume at another world size: set the micro batch and accumulation that keep the
    checkpoint's global batch (said in one line); the bank and the data position follow on load."""
    if not args.resume:
        return None
    elastic = check_resume(os.path.join(args.output_dir, "checkpoints"), world, args.micro_batch_size,
                           args.gradient_accumulation_steps)
    if elastic is not None:
        args.micro_batch_size = elastic.micro_batch_size
        args.gradient_accumulation_steps = elastic.gradient_accumulation_steps
        if rank == 0:
            print(elastic.describe(), flush=True)
    return elastic


def check_resumed_flags(before: dict, now: dict) -> None:
    """A resumed run must train as it did before the stop. ``before``: the checkpoint's values of
    the flags that decide that (its saved arguments), ``now``: this command's, each without the
    flags its other settings make inert. UserError naming the checkpoint's values to pass."""
    if before == now:
        return
    changed = {k: v for k, v in before.items() if k not in now or now[k] != v} or before
    said = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items())
    raise UserError(f"--resume: the checkpoint was trained with {said}; pass the same to resume it "
                    "(or start a new run)")


def resumed_micro_step(state: dict, accumulation: int) -> int:
    """The saved micro-step count in this run's accumulation (checkpoints fall on optimizer steps)."""
    saved = int(state["args"].get("gradient_accumulation_steps", accumulation))
    return int(state["micro_step"]) // saved * accumulation


def checkpoint_world_size(save_dir: str) -> int | None:
    """World size recorded in the newest checkpoint (from its per-rank RNG files)."""
    tag = latest_tag(save_dir)
    if tag is None:
        return None
    return len([f for f in os.listdir(os.path.join(save_dir, tag)) if f.startswith("rng_rank")])


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> None:
    """An output dir that already holds a run is used only with --resume or --overwrite_output_dir."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return
    if resume:
        if latest_tag(os.path.join(output_dir, "checkpoints")) is None:
            raise UserError(f"--resume: {output_dir} holds no checkpoint to resume from")
        return
    if not overwrite:
        raise UserError(f"output dir {output_dir} already holds a run; pass --resume to continue it "
                        "or --overwrite_output_dir to replace it")


def latest_tag(save_dir: str) -> str | None:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag if os.path.isdir(os.path.join(save_dir, tag)) else None


def prune(save_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (all when <= 0) with their universal conversions;
    remove leftovers of killed saves and conversions."""
    for stale in (d for d in os.listdir(save_dir) if d.startswith(".tmp-step-")):
        shutil.rmtree(os.path.join(save_dir, stale), ignore_errors=True)
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(save_dir) if CHECKPOINT_NAME.fullmatch(d))
    for tag in tags[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, tag + UNIVERSAL), ignore_errors=True)
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)



# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
