"""Two-rank memory bank run under the real launcher; tests/test_bank.py compares it to one rank.

    deepspeed --num_gpus 2 --master_port PORT tests/dist_scripts/bank_equivalence.py --out DIR

Each rank fills a sharded bank (unequal local batches, wrap-around, repeated ids), computes a
COS-NCE loss from bank negatives for a small student linear layer, backpropagates through
``deepspeed.initialize``'s engine (which averages gradients over ranks) and writes
``DIR/rank{r}.pt``. The problem is built by ``make_problem`` so the test can replay it on one rank.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: lrcbert
from lrcbert.method.bank import MemoryBank  # noqa: E402

NUM_LAYERS, SIZE, DIM, IN_FEATURES, K, SEED = 2, 12, 16, 6, 5, 1234
# Local batch sizes per enqueue step as (rank 0, rank 1); 16 rows wrap a 12-slot bank.
ENQUEUE_SPLITS = [(2, 2), (3, 1), (2, 2), (1, 3)]
TRAIN_SPLIT = (2, 2)  # equal local batches: DeepSpeed's mean of local means = global mean
UNEQUAL_SPLIT = (3, 1)


def make_problem() -> dict:
    """Seeded global data: enqueue batches, student inputs/weights, teacher positives."""
    gen = torch.Generator().manual_seed(7)
    enqueues = []
    for step, split in enumerate(ENQUEUE_SPLITS):
        rows = sum(split)
        vectors = [torch.randn(rows, DIM, generator=gen) * 3 for _ in range(NUM_LAYERS)]
        ids = (torch.arange(rows) + rows * step) % 10  # ids repeat: a "later epoch"
        enqueues.append((split, vectors, ids))
    linear = torch.nn.Linear(IN_FEATURES, NUM_LAYERS * DIM)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen))
    return {
        "enqueues": enqueues,
        "weight": linear.weight.detach().clone(),
        "bias": linear.bias.detach().clone(),
        "x": torch.randn(sum(TRAIN_SPLIT), IN_FEATURES, generator=gen),
        "ids": torch.tensor([0, 3, 11, 7]),  # 0, 3 and 7 also sit in the bank
        "teacher": [torch.randn(sum(TRAIN_SPLIT), DIM, generator=gen) for _ in range(NUM_LAYERS)],
        "unequal_z": [torch.randn(sum(UNEQUAL_SPLIT), DIM, generator=gen) for _ in range(NUM_LAYERS)],
        "unequal_ids": torch.tensor([1, 2, 5, 12]),
    }


def make_bank(rank: int = 0, world_size: int = 1) -> MemoryBank:
    return MemoryBank(NUM_LAYERS, SIZE, DIM, rank, world_size, dtype=torch.float16, seed=SEED)


def rows_of(split: tuple, rank: int, world_size: int) -> slice:
    """This rank's rows of a global batch; world 1 takes them all."""
    if world_size == 1:
        return slice(0, sum(split))
    return slice(sum(split[:rank]), sum(split[: rank + 1]))


def student_vectors(linear: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    return list(linear(x).view(x.shape[0], NUM_LAYERS, DIM).unbind(1))  # per layer (B, F)


def cos_nce(z_s: list, z_t: list, neg_sums: list, k: int) -> torch.Tensor:
    """Mean over rows of sum over layers of g_pos + (2K - (S_neg - K g_pos)) / (2K)."""
    total = 0.0
    for s, t, neg in zip(z_s, z_t, neg_sums):
        g_pos = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
        total = total + g_pos + (2 * k - (neg - k * g_pos)) / (2 * k)
    return total.mean()


def fill(bank: MemoryBank, problem: dict, rank: int, world_size: int) -> None:
    for split, vectors, ids in problem["enqueues"]:
        rows = rows_of(split, rank, world_size)
        bank.enqueue([v[rows] for v in vectors], ids[rows])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the launcher
    args = parser.parse_args()

    import deepspeed
    import torch.distributed as dist

    from lrcbert.runtime.engine import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    problem = make_problem()
    bank = make_bank(rank, world)
    fill(bank, problem, rank, world)
    contents, contents_ids = bank.global_contents()
    shard = {key: value.clone() for key, value in bank.state_dict().items()}  # before sampling

    linear = torch.nn.Linear(IN_FEATURES, NUM_LAYERS * DIM)
    linear.load_state_dict({"weight": problem["weight"], "bias": problem["bias"]})
    engine, *_ = deepspeed.initialize(
        model=linear,
        optimizer=torch.optim.SGD(linear.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": TRAIN_SPLIT[rank], "gradient_accumulation_steps": 1,
                "train_batch_size": sum(TRAIN_SPLIT), "zero_optimization": {"stage": 0}},
    )
    rows = rows_of(TRAIN_SPLIT, rank, world)
    z_s = student_vectors(engine, problem["x"][rows])
    sums, k = bank.negative_distance_sums(z_s, problem["ids"][rows], K)
    loss = cos_nce(z_s, [t[rows] for t in problem["teacher"]], sums, k)  # mean over local rows
    engine.backward(loss)  # DeepSpeed averages the gradients over ranks
    weight_grad, bias_grad = linear.weight.grad.clone(), linear.bias.grad.clone()

    # Unequal local batches: per-row sums and the gradient w.r.t. each rank's own vectors.
    rows = rows_of(UNEQUAL_SPLIT, rank, world)
    z = [v[rows].clone().requires_grad_(True) for v in problem["unequal_z"]]
    unequal_sums, _ = bank.negative_distance_sums(z, problem["unequal_ids"][rows], K)
    torch.stack(unequal_sums).square().sum().backward()

    result = {
        "loss": loss.detach(), "sums": [s.detach() for s in sums],
        "weight_grad": weight_grad, "bias_grad": bias_grad,
        "unequal_sums": [s.detach() for s in unequal_sums], "unequal_grads": [v.grad for v in z],
        "contents": contents, "contents_ids": contents_ids,
        "shard": shard,
    }
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
