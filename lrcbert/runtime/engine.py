"""The one seam to DeepSpeed: initialize, the process group, backward/step, checkpoint files.

The only module of the project that imports deepspeed (lazily, inside the functions that need
it). ds_config resolution is ``ds_config.py``; the checkpoint layout and its checks are
``checkpoints.py``; both are DeepSpeed-free.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys

import torch

from lrcbert.errors import UserError
from lrcbert.runtime import checkpoints
from lrcbert.runtime.ds_config import zero_stage as zero_stage_of
from lrcbert.runtime.ranks import (barrier, broadcast_from_main, env_local_rank, export_launcher_env,
                                   group_initialized, is_main, rank_and_world)


def deepspeed_version() -> str | None:
    """DeepSpeed's version once its accelerator is set up, or None where it cannot load."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        get_accelerator()
    except Exception:  # an optional dependency for benchmarks that never start an engine
        return None
    return deepspeed.__version__


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

    if group_initialized():
        return
    export_launcher_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env_local_rank())
    else:
        skip_cpu_shm_comm_build()
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # torch's DistNetworkError is a RuntimeError
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise UserError(f"port {os.environ.get('MASTER_PORT')} on {os.environ.get('MASTER_ADDR')} is taken by "
                            "another process; set MASTER_PORT (deepspeed --master_port) to a free port") from None
        raise


def build_optimizer(module: torch.nn.Module, learning_rate: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (1-D parameters).

    PyTorch's fused kernel on CUDA and on CPU (about 4.5x faster than the multi-tensor one for
    the default student on two cores: 10 against 47 ms a step, `bench/step_efficiency.py`); the
    same update up to float rounding.
    """
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    devices = {p.device.type for p in module.parameters() if p.requires_grad}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=devices <= {"cpu", "cuda"})


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
        """The training forward: DeepSpeed's engine (its backward hooks see this pass)."""
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
    def whole_parameters(self) -> list[torch.Tensor] | None:
        """The trained parameters when every rank holds them whole (ZeRO 0-2): a loss may then
        carry gradients taken outside the engine (add-mode perturbation). None under ZeRO-3,
        whose parameters are partitioned between forwards."""
        if self.zero_stage >= 3:
            return None
        return [p for p in self.module.parameters() if p.requires_grad]

    @property
    def zero_stage(self) -> int:
        return zero_stage_of(self.ds_config)

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

    def batch_layout(self) -> dict[str, int]:
        """Micro batch, accumulation and global batch, as recorded in ``meta.json``."""
        return {"micro_batch_size": int(self.ds_config["train_micro_batch_size_per_gpu"]),
                "gradient_accumulation_steps": int(self.ds_config["gradient_accumulation_steps"]),
                "global_batch_size": int(self.ds_config["train_batch_size"])}

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
        tag = checkpoints.step_tag(step)
        tmp = os.path.join(save_dir, f".tmp-{tag}")
        rank, world = rank_and_world()
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(save_dir, exist_ok=True)
        barrier()
        try:
            self.engine.save_checkpoint(save_dir, tag=os.path.basename(tmp),
                                        client_state=dict(client_state, world_size=world), save_latest=False)
            torch.save(checkpoints.rng_state(), checkpoints.rng_file(tmp, rank))
            if rank_state is not None:
                torch.save(rank_state, checkpoints.rank_state_file(tmp, rank))
            barrier()
            if is_main():
                checkpoints.write_meta(tmp, step, world, self.zero_stage, self.parameter_shapes(), self.batch_layout())
        except (OSError, RuntimeError) as exc:
            error = checkpoints.save_error(exc, save_dir, tag)  # before the cleanup frees the space
            if is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise error from None
        barrier()
        if is_main():
            checkpoints.publish(save_dir, tmp, tag, step, keep_last)
        barrier()
        return os.path.join(save_dir, tag)

    def load(self, save_dir: str) -> dict:
        """Restore the newest complete checkpoint; returns its client state.

        Refuses (UserError) a checkpoint of another model (parameter names or shapes differ)
        or one DeepSpeed cannot read. ZeRO-partitioned optimizer state saved at another world
        size is loaded through DeepSpeed's universal checkpoint (``universal_checkpoint``; the
        ds_config must then say ``"checkpoint": {"load_universal": true}``, as the recipes' setup
        does). Every rank's ``rank_state`` files are listed under
        ``client_state["rank_state_files"]`` (in rank order) so callers can re-shard when the
        world size changed.
        """
        tag = checkpoints.latest_tag(save_dir)
        if tag is None:
            raise UserError(f"--resume: no checkpoint in {save_dir} (no '{checkpoints.LATEST}' file)")
        folder = os.path.join(save_dir, tag)
        meta = checkpoints.verify_checkpoint(folder)
        if meta is not None:
            checkpoints.check_same_model(folder, meta["parameters"], self.parameter_shapes())
        rank, world = rank_and_world()
        universal = meta is not None and meta["world_size"] != world and checkpoints.is_partitioned(folder)
        load_tag = tag
        if universal:
            if not self.ds_config.get("checkpoint", {}).get("load_universal"):
                raise UserError(f"--resume: {folder} was saved by {meta['world_size']} ranks with ZeRO-partitioned "
                                "optimizer state; the ds_config must set \"checkpoint\": {\"load_universal\": true}")
            load_tag = os.path.basename(self.universal_checkpoint(folder, meta["world_size"]))
            groups = self.hyperparameters()
        try:
            path, client_state = self.engine.load_checkpoint(save_dir, tag=load_tag, load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
        except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError) as exc:
            raise UserError(f"--resume: cannot load checkpoint {folder} ({checkpoints.first_line(exc)}); it is "
                            f"damaged or from another model: point {os.path.join(save_dir, checkpoints.LATEST)} "
                            "to an earlier step-* or start afresh with --overwrite_output_dir") from None
        if path is None:
            raise UserError(f"--resume: checkpoint {folder} could not be loaded")
        if universal:
            self.repair_after_universal_load(groups)
        rng_path = checkpoints.rng_file(folder, rank)
        if client_state.get("world_size", world) == world and os.path.isfile(rng_path):
            checkpoints.set_rng_state(torch.load(rng_path, weights_only=False))
        client_state["rank_state_files"] = checkpoints.rank_state_files(folder)
        return client_state

    # ------------------------------------------------------------ another world size

    def universal_checkpoint(self, folder: str, saved_world: int) -> str:
        """``folder``'s universal conversion (``step-N.universal`` beside it), made once by rank 0.

        DeepSpeed's converter (``python -m deepspeed.checkpoint.ds_to_universal``) writes into a
        scratch folder that is renamed when complete, so a crash leaves no half conversion and the
        original checkpoint is only read. The other ranks wait for the outcome (a collective).
        """
        target = folder + checkpoints.UNIVERSAL
        error = None
        if is_main() and not os.path.isdir(target):
            error = convert_to_universal(folder, target, saved_world)
        error = broadcast_from_main(error)
        if error is not None:
            raise UserError(error)
        return target

    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW the recipe built (ZeRO wraps it)."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def hyperparameters(self) -> list[dict]:
        """Every parameter group's settings other than its parameters and the scheduled lr."""
        return [{k: v for k, v in group.items() if k not in ("params", "lr")}
                for group in self.torch_optimizer().param_groups]

    def repair_after_universal_load(self, groups: list[dict]) -> None:
        """Undo two things DeepSpeed 0.19's ZeRO-3 universal load gets wrong (harmless at ZeRO-1/2):

        * it copies the first parameter group's settings to every group, so the biases and
          LayerNorm weights would get the weight decay: the groups' own settings come back;
        * it gives every group's AdamW state one shared ``step`` tensor, which AdamW then
          increments once per group and step (wrong bias correction): each gets its own copy.
        """
        optimizer = self.torch_optimizer()
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def convert_to_universal(folder: str, target: str, saved_world: int) -> str | None:
    """Run DeepSpeed's converter on ``folder`` into ``target`` (atomically); an error line or None."""
    scratch = os.path.join(os.path.dirname(folder), f".tmp-{os.path.basename(target)}")
    shutil.rmtree(scratch, ignore_errors=True)
    # the converter writes OUTPUT/../latest_universal: inside the scratch folder, removed with it
    output = os.path.join(scratch, os.path.basename(target))
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
    print(f"converting {folder} to a universal checkpoint ...", flush=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
                               "--output_folder", output, "--inject_missing_state", "--num_extract_workers", workers,
                               "--num_merge_workers", workers], capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(output, target)
            return None
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        why = lines[-1][:300] if lines else f"exit status {proc.returncode}"
    except OSError as exc:
        why = checkpoints.first_line(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return (f"--resume: DeepSpeed could not convert {folder} to a universal checkpoint ({why}); the checkpoint is "
            f"unchanged: resume it with {saved_world} ranks")
