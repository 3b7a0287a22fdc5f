"""The one seam to DeepSpeed: config resolution, initialize, backward/step, checkpoints, ranks.

Nothing else in the library imports deepspeed. ``ds_configs/*.json`` hold DeepSpeed knobs
only (ZeRO stage, buckets, loss-scaler settings); values the trainer also knows are
``"auto"`` here and filled from the trainer's flags. A concrete value that disagrees with
a flag is refused, naming both.
"""

from __future__ import annotations

import copy
import datetime
import os
import random
import shutil
from dataclasses import dataclass

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

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

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

    def save(self, save_dir: str, step: int, client_state: dict, keep_last: int = 3,
             rank_state: dict | None = None) -> str:
        """Atomic checkpoint: written as ``.tmp-step-N``, renamed, then ``latest`` updated.

        Holds the DeepSpeed states (weights, optimizer, scheduler, loss scaler), the
        caller's ``client_state`` (data cursor, stage, bank, config) and every rank's RNG
        state. A crash mid-save leaves the previous checkpoint and ``latest`` intact.
        ``rank_state`` is saved per rank (e.g. this rank's memory-bank shard): DeepSpeed
        writes ``client_state`` from rank 0 only.
        """
        tag = f"step-{step:07d}"
        tmp_tag = f".tmp-{tag}"
        if is_main():
            shutil.rmtree(os.path.join(save_dir, tmp_tag), ignore_errors=True)
            os.makedirs(save_dir, exist_ok=True)
        barrier()
        client_state = dict(client_state, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        self.engine.save_checkpoint(save_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save(rng_state(), os.path.join(save_dir, tmp_tag, f"rng_rank{rank:05d}.pt"))
        if rank_state is not None:
            torch.save(rank_state, os.path.join(save_dir, tmp_tag, f"state_rank{rank:05d}.pt"))
        barrier()
        if is_main():
            final = os.path.join(save_dir, tag)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(save_dir, tmp_tag), final)
            _write_atomic(os.path.join(save_dir, LATEST), tag)
            _prune(save_dir, keep_last)
        barrier()
        return os.path.join(save_dir, tag)

    def load(self, save_dir: str) -> dict:
        """Restore the newest complete checkpoint; returns its client state.

        Every rank's ``rank_state`` files are listed under ``client_state["rank_state_files"]``
        (in rank order) so callers can re-shard when the world size changed.
        """
        tag = latest_tag(save_dir)
        if tag is None:
            raise UserError(f"--resume: no checkpoint in {save_dir} (no '{LATEST}' file)")
        world = dist.get_world_size() if dist.is_initialized() else 1
        path, client_state = self.engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"--resume: checkpoint {os.path.join(save_dir, tag)} could not be loaded")
        saved_world = client_state.get("world_size", world)
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_path = os.path.join(save_dir, tag, f"rng_rank{rank:05d}.pt")
        if saved_world == world and os.path.isfile(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=False))
        folder = os.path.join(save_dir, tag)
        client_state["rank_state_files"] = sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("state_rank"))
        return client_state


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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(save_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    tags = sorted(d for d in os.listdir(save_dir) if d.startswith("step-"))
    for tag in tags[:-keep_last]:
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
