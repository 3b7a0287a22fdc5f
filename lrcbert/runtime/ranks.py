"""Ranks: from the launcher's environment before the process group exists, from the group after.

Launchers: the deepspeed launcher and torchrun set RANK, WORLD_SIZE, LOCAL_RANK; under `srun`
(one task per GPU) the SLURM variables stand in for them; under `mpirun` the Open MPI ones
(DeepSpeed's MPI discovery fills MASTER_ADDR/PORT from mpi4py).
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

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
    if "MASTER_PORT" not in os.environ:  # ranks of one job must agree on it; a lone process needs none in particular
        os.environ["MASTER_PORT"] = str(_free_port()) if env_world_size() == 1 else "29500"
    for target, names in (("RANK", _RANK_VARS), ("WORLD_SIZE", _WORLD_VARS), ("LOCAL_RANK", _LOCAL_VARS)):
        if target not in os.environ:
            os.environ[target] = str(_first_env(names, "1" if target == "WORLD_SIZE" else "0"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank() -> int:
    return _first_env(_RANK_VARS, "0")


def env_world_size() -> int:
    return _first_env(_WORLD_VARS, "1")


def env_local_rank() -> int:
    return _first_env(_LOCAL_VARS, "0")


def group_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none exists."""
    if group_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0: the only rank that prints and writes files (from the environment before the group exists)."""
    if group_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def barrier() -> None:
    if group_initialized():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself without a group."""
    if not group_initialized() or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env_local_rank())
    return torch.device("cpu")
