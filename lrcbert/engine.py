"""The one seam to DeepSpeed: config resolution, initialize, backward/step, checkpoints, ranks.

Nothing else in the library imports deepspeed. ``ds_configs/*.json`` hold DeepSpeed knobs
only (ZeRO stage, buckets, loss-scaler settings); values the trainer also knows are
``"auto"`` here and filled from the trainer's flags. A concrete value that disagrees with
a flag is refused, naming both.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from lrcbert.config import load_json_object
from lrcbert.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
# Sections the trainer owns: the optimizer and scheduler are built in Python so the same
# code runs on CPU (gloo) and GPU (NCCL) and their state is checkpointed by DeepSpeed.
TRAINER_OWNED_SECTIONS = ("optimizer", "scheduler")
LATEST = "latest"
META = "meta.json"  # written into every checkpoint last: world size, ZeRO stage, parameter shapes, file sizes
PREEMPTED = "preempted"  # marker file in OUTPUT_DIR: the run stopped on a signal and can be resumed
EXIT_PEER_DIED = 3  # exit status of a rank that stops because another rank died
# Test hook (tests/test_reliability.py): a step number; rank 0 pauses for good after that checkpoint's
# temporary directory is complete and before it is renamed, so a test can kill a run mid-save.
PAUSE_BEFORE_RENAME_ENV = "LRCBERT_PAUSE_BEFORE_RENAME"
# Test hook: seconds every rank sleeps after each optimizer step. Tiny test runs finish ten steps in
# under a second, faster than a test can watch for "past a checkpoint" and kill; the pause changes no
# numbers (nothing random or timed feeds the maths), it only slows the run down to a test's pace.
STEP_DELAY_ENV = "LRCBERT_STEP_DELAY"


# ---------------------------------------------------------------- ranks (from the launcher's env)

# Launchers: the deepspeed launcher / torchrun set RANK, WORLD_SIZE, LOCAL_RANK; under
# `srun` (one task per GPU) the SLURM variables stand in for them; under `mpirun` the
# Open MPI ones (DeepSpeed's MPI discovery fills MASTER_ADDR/PORT from mpi4py).
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_LOCAL_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def _first_env(names: tuple[str, ...], default: str) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return int(default)


def export_launcher_env() -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK (and a local master) when the launcher left them out.

    Under ``mpirun`` nothing is set: DeepSpeed's MPI discovery (mpi4py) finds the ranks and
    broadcasts rank 0's address as the master.
    """
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    for target, names in (("RANK", _RANK_VARS), ("WORLD_SIZE", _WORLD_VARS), ("LOCAL_RANK", _LOCAL_VARS)):
        if target not in os.environ:
            os.environ[target] = str(_first_env(names, "1" if target == "WORLD_SIZE" else "0"))


def env_rank() -> int:
    return _first_env(_RANK_VARS, "0")


def env_world_size() -> int:
    return _first_env(_WORLD_VARS, "1")


def env_local_rank() -> int:
    return _first_env(_LOCAL_VARS, "0")


def is_main() -> bool:
    """Rank 0: the only rank that prints and writes files."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env_local_rank())
    return torch.device("cpu")


# ---------------------------------------------------------------- ds_config

@dataclass(frozen=True)
class TrainerSettings:
    """What the trainer knows and the ds_config must agree with."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    gradient_clipping: float
    precision: str

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def _fill(config: dict, key: str, value, flag: str, source: str) -> None:
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise UserError(f"{source}: {key} is {current} but {flag} gives {value}; set it to \"auto\" or change the flag")


def resolve_ds_config(path: str, settings: TrainerSettings) -> dict:
    """Load a ds_config, fill its ``"auto"`` values and check it against the trainer.

    Checks ``train_batch_size == micro batch x accumulation x world size`` and that the
    precision sections agree with ``--precision``. Raises UserError naming the problem.
    """
    raw = load_json_object(path, "ds_config")
    if settings.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    for section in TRAINER_OWNED_SECTIONS:
        if section in raw:
            raise UserError(f"{path}: remove the \"{section}\" section; the trainer builds the {section} "
                            f"from its flags (--learning_rate, --warmup, --weight_decay)")
    config = copy.deepcopy(raw)
    _fill(config, "train_micro_batch_size_per_gpu", settings.micro_batch_size, "--micro_batch_size", path)
    _fill(config, "gradient_accumulation_steps", settings.gradient_accumulation_steps,
          "--gradient_accumulation_steps", path)
    _fill(config, "gradient_clipping", settings.gradient_clipping, "--max_grad_norm", path)
    batch = config.get("train_batch_size", "auto")
    if batch == "auto":
        config["train_batch_size"] = settings.global_batch_size
    elif batch != settings.global_batch_size:
        raise UserError(
            f"{path}: train_batch_size is {batch} but micro batch {settings.micro_batch_size} x accumulation "
            f"{settings.gradient_accumulation_steps} x world size {settings.world_size} = {settings.global_batch_size}")
    for name in ("fp16", "bf16"):
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            raise UserError(f"{path}: \"{name}\" must be an object")
        wanted = settings.precision == name
        enabled = section.get("enabled", "auto")
        if enabled == "auto":
            section["enabled"] = wanted
        elif bool(enabled) != wanted:
            raise UserError(f"{path}: {name}.enabled is {str(enabled).lower()} but --precision is {settings.precision}")
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise UserError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero.get('stage')}")
    unresolved = [k for k, v in _walk(config) if v == "auto"]
    if unresolved:
        raise UserError(f"{path}: the trainer cannot fill \"auto\" for {', '.join(unresolved)}")
    # our optimizer is a plain torch one: tell ZeRO that is intended
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 10**9)
    return config


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def check_precision_supported(precision: str) -> None:
    """Refuse a precision the accelerator cannot train in, before any process starts work."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if precision == "fp16" and not acc.is_fp16_supported():
        raise UserError(f"--precision fp16 is not supported on this {acc.device_name()} device "
                        "(on CPUs DeepSpeed needs AVX512-FP16); use --precision bf16 or fp32")
    if precision == "bf16" and not acc.is_bf16_supported():
        raise UserError(f"--precision bf16 is not supported on this {acc.device_name()} device; use fp16 or fp32")


# ---------------------------------------------------------------- initialize / train

def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU ranks.

    DeepSpeed's CPU backend builds that op (used only by its inference all-reduce; training
    collectives go through gloo) on every process start, under a file lock in the torch extensions
    cache. A process killed while holding the lock (preemption, SIGKILL, a timeout) leaves the lock
    behind and every later start on the machine waits on it forever. DeepSpeed keeps one
    ``__compatible_ops__`` registry that it reads before building, so marking the op incompatible
    there skips the build.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Start the process group (NCCL on GPUs, gloo on CPUs) from the launcher's environment."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():
        return
    export_launcher_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
    else:
        skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def build_optimizer(module: torch.nn.Module, learning_rate: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (1-D parameters)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=torch.cuda.is_available())


class Engine:
    """A DeepSpeed engine behind a small API the recipes use."""

    def __init__(self, module: torch.nn.Module, optimizer, lr_lambda, ds_config: dict):
        import deepspeed

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.ds_config = ds_config
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.module = self.engine.module
        self.step_delay = float(os.environ.get(STEP_DELAY_ENV) or 0)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()
        if self.step_delay:
            time.sleep(self.step_delay)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    @property
    def global_steps(self) -> int:
        """Optimizer updates so far (skipped fp16 overflow steps included)."""
        return self.engine.global_steps

    @property
    def skipped_steps(self) -> int:
        return self.engine.skipped_steps

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def loss_scale(self) -> float:
        """The dynamic fp16 loss scale (1.0 without fp16)."""
        if not self.ds_config.get("fp16", {}).get("enabled"):
            return 1.0
        opt = self.engine.optimizer
        for holder in (opt, getattr(opt, "loss_scaler", None)):
            for attr in ("cur_scale", "loss_scale"):
                value = getattr(holder, attr, None) if holder is not None else None
                if isinstance(value, (int, float)) or torch.is_tensor(value):
                    return float(value)
        return 1.0

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def full_state_dict(self) -> dict | None:
        """The whole module's weights in fp32 on rank 0 (None elsewhere). A collective:
        every rank must call it (ZeRO-3 gathers its partitions)."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict()
        if not is_main():
            return None
        return {k: v.detach().to(torch.float32).cpu() for k, v in state.items()}

    # ------------------------------------------------------------ checkpoints

    def parameter_shapes(self) -> dict[str, list[int]]:
        """Every parameter's full shape (ZeRO-3 partitions report their unpartitioned ``ds_shape``)."""
        return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in self.module.named_parameters()}

    def save(self, save_dir: str, step: int, client_state: dict, keep_last: int = 3,
             rank_state: dict | None = None) -> str:
        """Atomic checkpoint: written as ``.tmp-step-N``, renamed, then ``latest`` updated.

        Holds the DeepSpeed states (weights, optimizer, scheduler, loss scaler), the
        caller's ``client_state`` (data cursor, stage, bank, config), every rank's RNG
        state and ``meta.json`` (world size, ZeRO stage, parameter shapes, every file's size),
        written last. A crash mid-save leaves the previous checkpoint and ``latest`` intact;
        a full disk removes the partial checkpoint and raises UserError saying so.
        ``rank_state`` is saved per rank (e.g. this rank's memory-bank shard): DeepSpeed
        writes ``client_state`` from rank 0 only.
        """
        tag = f"step-{step:07d}"
        tmp_tag = f".tmp-{tag}"
        tmp = os.path.join(save_dir, tmp_tag)
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(save_dir, exist_ok=True)
        barrier()
        client_state = dict(client_state, world_size=world)
        try:
            self.engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
            torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank:05d}.pt"))
            if rank_state is not None:
                torch.save(rank_state, os.path.join(tmp, f"state_rank{rank:05d}.pt"))
            barrier()
            if is_main():
                meta = {"step": step, "world_size": world, "zero_stage": self.zero_stage,
                        "parameters": self.parameter_shapes(), "files": _file_sizes(tmp)}
                _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1))
        except (OSError, RuntimeError) as exc:
            error = _save_error(exc, save_dir, tag)  # before the cleanup frees the space
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        barrier()
        if is_main():
            pause = os.environ.get(PAUSE_BEFORE_RENAME_ENV)
            if pause is not None and int(pause) == step:
                print(f"{PAUSE_BEFORE_RENAME_ENV}: {tmp} is complete; pausing before the rename",
                      file=sys.stderr, flush=True)
                time.sleep(3600)
            final = os.path.join(save_dir, tag)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            try:
                _write_atomic(os.path.join(save_dir, LATEST), tag)  # atomic: the old pointer or the new one
            except OSError as exc:
                raise _save_error(exc, save_dir, tag) from None
            _prune(save_dir, keep_last)
        barrier()
        return os.path.join(save_dir, tag)

    def load(self, save_dir: str) -> dict:
        """Restore the newest complete checkpoint; returns its client state.

        Refuses (UserError) a checkpoint of another model (parameter names or shapes differ)
        or one DeepSpeed cannot read. Every rank's ``rank_state`` files are listed under
        ``client_state["rank_state_files"]`` (in rank order) so callers can re-shard when the
        world size changed.
        """
        tag = latest_tag(save_dir)
        if tag is None:
            raise UserError(f"--resume: no checkpoint in {save_dir} (no '{LATEST}' file)")
        folder = os.path.join(save_dir, tag)
        meta = verify_checkpoint(folder)
        if meta is not None:
            _check_same_model(folder, meta["parameters"], self.parameter_shapes())
        world = dist.get_world_size() if dist.is_initialized() else 1
        try:
            path, client_state = self.engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError) as exc:
            raise UserError(f"--resume: cannot load checkpoint {folder} ({_first_line(exc)}); it is damaged or "
                            f"from another model: point {os.path.join(save_dir, LATEST)} to an earlier step-* "
                            "or start afresh with --overwrite_output_dir") from None
        if path is None:
            raise UserError(f"--resume: checkpoint {folder} could not be loaded")
        saved_world = client_state.get("world_size", world)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_path = os.path.join(folder, f"rng_rank{rank:05d}.pt")
        if saved_world == world and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=False))
        client_state["rank_state_files"] = sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("state_rank"))
        return client_state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _file_sizes(folder: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder)] = os.path.getsize(path)
    return sizes


def _save_error(exc: BaseException, save_dir: str, tag: str) -> UserError:
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
    return UserError(f"cannot write checkpoint {tag} in {save_dir} ({_first_line(exc)}); {kept}")


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
        raise UserError(f"--resume: {path} is unreadable ({_first_line(exc)})") from None
    for name, size in sorted(files.items()):
        file = os.path.join(folder, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual != size:
            what = "is missing" if actual is None else f"has {actual} bytes"
            raise UserError(f"--resume: checkpoint {folder} is damaged: {name} {what}, {META} recorded {size} "
                            "bytes; point the 'latest' file to an earlier step-* or start afresh")
    return meta


def _check_same_model(folder: str, saved: dict, current: dict) -> None:
    if saved == current:
        return
    for name in sorted(set(saved) | set(current)):
        there, here = saved.get(name), current.get(name)
        if there != here:
            raise UserError(f"--resume: checkpoint {folder} holds another model: parameter {name} is "
                            f"{there or 'absent'} there and {here or 'absent'} here (other student, teacher, "
                            "task or layer-map flags?)")


def check_resume(ckpt_dir: str, world: int, reshardable: bool) -> None:
    """Before any process group: the checkpoint to resume is complete, and loadable at this world size.

    DeepSpeed 0.19 reloads ZeRO-partitioned optimizer state only at the world size that saved it;
    ``reshardable`` says whether the recipe converts its own state (data position, bank) otherwise.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir} (no '{LATEST}' file)")
    folder = os.path.join(ckpt_dir, tag)
    meta = verify_checkpoint(folder)
    saved = meta["world_size"] if meta is not None else checkpoint_world_size(ckpt_dir)
    if saved == world:
        return
    if any("zero_pp_rank_" in name for name in os.listdir(folder)):
        raise UserError(f"--resume: {folder} was saved by {saved} ranks with ZeRO-partitioned optimizer state, "
                        f"which DeepSpeed cannot load at world size {world}; resume with {saved} ranks")
    if not reshardable:
        raise UserError(f"--resume: {folder} was saved by {saved} ranks; this recipe resumes only at the world "
                        f"size that saved it; resume with {saved} ranks")


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


def _write_atomic(path: str, text: str, sync: bool = True) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(save_dir: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (all when <= 0); remove leftovers of killed saves."""
    for stale in (d for d in os.listdir(save_dir) if d.startswith(".tmp-step-")):
        shutil.rmtree(os.path.join(save_dir, stale), ignore_errors=True)
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(save_dir) if d.startswith("step-"))
    for tag in tags[:-keep_last]:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


# ---------------------------------------------------------------- run guards: signals, dead ranks, bad losses

class Preemption:
    """SIGUSR1/SIGTERM only set a flag; the loop checkpoints and stops at the next step boundary.

    Entered first thing in a recipe's ``main`` so that a signal during start-up (reading data,
    loading models) is not fatal: the run checkpoints after its first step. Leaving the block
    restores the previous handlers.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "Preemption":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.requested = True

    @staticmethod
    def mark(output_dir: str, done: int, total: int) -> None:
        """Leave ``OUTPUT_DIR/preempted`` (rank 0): the run stopped on a signal and can be resumed."""
        with open(os.path.join(output_dir, PREEMPTED), "w") as f:
            f.write(f"step {done} of {total}: continue with --resume\n")

    @staticmethod
    def clear_mark(output_dir: str) -> None:
        """Remove the marker once a run has resumed (rank 0)."""
        path = os.path.join(output_dir, PREEMPTED)
        if os.path.exists(path):
            os.remove(path)

    def agreed(self, device) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Watchdog:
    """Notices a dead rank, so that the others stop instead of waiting in a collective.

    Every rank keeps a heartbeat file ``OUTPUT_DIR/.ranks/rankNNNNN.json`` (pid, host, state)
    and touches it every ``interval_s``; a thread checks the peers. A peer is dead when it is
    on this host and its process is gone (seen within ``interval_s``), or when its heartbeat
    has not changed for ``timeout_s`` (another host; ``--dist_timeout``). Then this rank prints
    ``error: rank R ... died`` and exits with ``EXIT_PEER_DIED`` (``os._exit``: the main thread
    may be blocked in a collective). A rank that leaves on purpose marks its file ``exited``.
    Costs one stat per peer per interval; the files need the shared output dir checkpoints
    already need.
    """

    def __init__(self, output_dir: str, rank: int, world: int, timeout_s: float, interval_s: float = 1.0):
        self.folder = os.path.join(output_dir, ".ranks")
        self.rank, self.world = rank, world
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = None
        self._seen: dict[int, tuple[float, float]] = {}  # rank -> (file mtime, local time it last changed)
        os.makedirs(self.folder, exist_ok=True)
        self._write("running")

    def _path(self, rank: int) -> str:
        return os.path.join(self.folder, f"rank{rank:05d}.json")

    def _write(self, state: str) -> None:
        _write_atomic(self._path(self.rank), json.dumps({"pid": os.getpid(), "host": self.host, "state": state}),
                      sync=False)

    @classmethod
    def start_all(cls, output_dir: str, timeout_s: float) -> "Watchdog":
        """Collective: every rank's watchdog, started once all heartbeat files exist.
        ``output_dir`` must exist (or be created by rank 0) when any rank calls this."""
        barrier()  # rank 0 may just have created output_dir
        watchdog = cls(output_dir, dist.get_rank(), dist.get_world_size(), timeout_s)
        barrier()
        return watchdog.start()

    def start(self) -> "Watchdog":
        """Call after a barrier that follows every rank's construction (all files exist)."""
        if self.world > 1:
            self._thread = threading.Thread(target=self._run, name="lrcbert-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """This rank leaves on purpose: stop watching, tell the peers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._write("exited")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                os.utime(self._path(self.rank))
                message = self.dead_peer()
            except OSError:
                continue  # a transient file-system error is no verdict
            if message and not self._stop.is_set():
                print_error(message)
                os._exit(EXIT_PEER_DIED)

    def dead_peer(self) -> str | None:
        """A one-line verdict on the first dead peer, or None."""
        now = time.monotonic()
        for peer in range(self.world):
            if peer == self.rank:
                continue
            path = self._path(peer)
            try:
                with open(path) as f:
                    info = json.load(f)
                mtime = os.stat(path).st_mtime
            except (OSError, ValueError):
                continue  # being replaced right now
            if info.get("state") == "exited":
                continue
            who = f"rank {peer} (pid {info['pid']} on {info['host']})"
            if info["host"] == self.host and not _process_alive(info["pid"]):
                return f"{who} died; stopping rank {self.rank} too (continue with --resume)"
            last_mtime, changed = self._seen.get(peer, (mtime, now))
            if mtime != last_mtime:
                changed = now
            self._seen[peer] = (mtime, changed)
            if now - changed > self.timeout_s:
                return (f"{who} stopped responding: no heartbeat for {now - changed:.0f} s (--dist_timeout "
                        f"{self.timeout_s:g}); stopping rank {self.rank} too (continue with --resume)")
        return None


def _process_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on a line of its own even below a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)
    sys.stderr.flush()


def dead_peer_after_failure(watchdog: Watchdog | None, wait_s: float = 5.0) -> str | None:
    """After a collective failed: the dead peer that explains it (polled for ``wait_s``), or None."""
    if watchdog is None or watchdog.world == 1:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        message = watchdog.dead_peer()
        if message or time.monotonic() > deadline:
            return message
        time.sleep(0.2)


def run_training(train, *args, **kwargs) -> int:
    """Call ``train(*args, guards=..., **kwargs)`` and turn how it ends into the exit status.

    ``guards["watchdog"]`` is where ``train`` puts its :class:`Watchdog` once the process group
    is up. 0: done (or preempted and checkpointed); 2: a :class:`UserError`, printed once as
    ``error: ...``; ``EXIT_PEER_DIED``: a collective failed because another rank died (named).
    Any other exception propagates. The watchdog is stopped on every path.
    """
    guards = {"watchdog": None}
    try:
        train(*args, guards=guards, **kwargs)
    except UserError as exc:
        if is_main():
            print_error(str(exc))
        return 2
    except Exception:  # a collective failed: name the dead rank if that is the cause
        message = dead_peer_after_failure(guards["watchdog"])
        if message is None:
            raise
        print_error(message)
        return EXIT_PEER_DIED
    finally:
        if guards["watchdog"] is not None:
            guards["watchdog"].stop()
    return 0


def check_finite_loss(loss: torch.Tensor, step: int, micro_step: int, example_ids: Callable[[], list],
                      what: str = "examples") -> None:
    """UserError on every rank if any rank's loss is NaN/inf, naming the step, the rank and the
    examples of its micro-batch (so bad data can be found); one tiny all-reduce per micro-step.

    ``example_ids`` is a callable returning the micro-batch's ids: it runs only on a rank whose
    loss is bad, so the hot path moves no ids from the device."""
    bad = torch.isfinite(loss.detach()).all().logical_not().float().reshape(1)  # on the device: no sync yet
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return
    mine = None if torch.isfinite(loss.detach()).all() else (float(loss.detach().float()), list(example_ids()))
    reports = [mine]
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, mine)
    rank, (value, ids) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    raise UserError(f"loss is {value} at step {step + 1} (micro-step {micro_step + 1}) on rank {rank}; "
                    f"its micro-batch holds {what} {ids}: check them for bad values")


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
