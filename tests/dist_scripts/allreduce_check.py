"""One rank of a torch.distributed (gloo) all_reduce, launched by ``srun``.

Rank layout comes from SLURM: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_NTASKS,
LOCAL_RANK=SLURM_LOCALID.  MASTER_ADDR must be exported by the batch script (first host
of ``scontrol show hostnames $SLURM_JOB_NODELIST``); MASTER_PORT likewise.

Each rank contributes ``rank + 1``; the sum must be ``W * (W + 1) / 2``.  Every rank
writes ``<out_dir>/rank<R>.json`` with its rank, hostname and the reduced value.

    srun python tests/dist_scripts/allreduce_check.py OUT_DIR
"""

import json
import os
import socket
import sys
from datetime import timedelta


def main() -> int:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ALLREDUCE_OUT", ".")
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise SystemExit(f"{var} not set (the batch script must export it)")

    import torch
    import torch.distributed as dist

    dist.init_process_group(
        backend="gloo", init_method="env://", rank=rank, world_size=world,
        timeout=timedelta(seconds=90),
    )
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    result = t.item()
    dist.barrier()
    dist.destroy_process_group()

    # The local address this rank uses to reach the master (a namespace address in the
    # two-node cluster): evidence that the traffic crossed the bridge over TCP/IP.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        local_addr = s.getsockname()[0]

    record = {
        "rank": rank,
        "world_size": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "hostname": socket.gethostname(),
        "local_addr": local_addr,
        "master_addr": os.environ["MASTER_ADDR"],
        "master_port": int(os.environ["MASTER_PORT"]),
        "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "result": result,
        "expected": world * (world + 1) / 2,
    }
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))
    print(json.dumps(record), flush=True)
    return 0 if result == record["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
