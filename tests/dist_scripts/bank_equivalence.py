"""Memory bank and batch negatives at W ranks under the real launcher; tests/test_bank.py
compares each rank's results with one rank replaying the same draw on the same contents.

    deepspeed --num_gpus W --master_port PORT tests/dist_scripts/bank_equivalence.py --out DIR

Each rank fills a sharded, grouped bank (unequal local batches, wrap-around, repeated ids),
computes a COS-NCE loss from bank negatives for a small student linear layer, backpropagates
through ``deepspeed.initialize``'s engine (which averages gradients over ranks), scores
unequal local batches, draws batch negatives (vectors of different widths per rank), counts
the bytes of every collective of one bank draw+score, one enqueue and one batch-negatives
draw+score, and writes ``DIR/rank{r}.pt``. The data come from ``make_problem(world)`` so the
test can replay them on one rank.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: lrcbert, bench
from bench.collectives import COUNTS, TAG, by_kind, install_counters  # noqa: E402
from lrcbert.method.bank import MemoryBank  # noqa: E402

NUM_LAYERS, SIZE, GROUPS, DIM, IN_FEATURES, K, SEED = 2, 24, 4, 16, 6, 4, 1234
ENQUEUE_STEPS = 6
TRAIN_ROWS = 2  # per rank, equal: DeepSpeed's mean of local means = global mean
UNEQUAL_SPLITS = {2: (3, 1), 4: (3, 1, 2, 1)}
BATCH_SPLITS = {2: (3, 2), 4: (3, 2, 3, 2)}  # batch negatives: B_min 2, K 4 -> c = min(W, 3) owners
BATCH_K = 4
TRAFFIC_ROWS = 3  # per rank, at every world size: the per-rank traffic must not change with W


def make_problem(world: int) -> dict:
    """Seeded global data for ``world`` ranks: enqueue batches, student, positives, batch negatives."""
    gen = torch.Generator().manual_seed(7 + world)
    enqueues = []
    for step in range(ENQUEUE_STEPS):
        split = tuple(int(n) for n in torch.randint(1, 4, (world,), generator=gen))
        rows = sum(split)
        vectors = [torch.randn(rows, DIM, generator=gen) * 3 for _ in range(NUM_LAYERS)]
        ids = (torch.arange(rows) + rows * step) % 17  # ids repeat: a "later epoch"
        enqueues.append((split, vectors, ids))
    linear = torch.nn.Linear(IN_FEATURES, NUM_LAYERS * DIM)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen))
    train = TRAIN_ROWS * world
    unequal, batch = sum(UNEQUAL_SPLITS[world]), sum(BATCH_SPLITS[world])
    widths = [DIM - 2 * r for r in range(world)]  # flatten pooling: ranks padded to other lengths
    return {
        "enqueues": enqueues,
        "weight": linear.weight.detach().clone(),
        "bias": linear.bias.detach().clone(),
        "x": torch.randn(train, IN_FEATURES, generator=gen),
        "ids": (torch.arange(train) * 5) % 17,  # most of them also sit in the bank
        "teacher": [torch.randn(train, DIM, generator=gen) for _ in range(NUM_LAYERS)],
        "unequal_z": [torch.randn(unequal, DIM, generator=gen) for _ in range(NUM_LAYERS)],
        "unequal_ids": torch.arange(unequal) + 3,
        "batch_teacher": [[torch.randn(n, w, generator=gen) for n, w in zip(BATCH_SPLITS[world], widths)]
                          for _ in range(NUM_LAYERS)],
        "batch_z": [torch.randn(batch, DIM, generator=gen) for _ in range(NUM_LAYERS)],
        "traffic_ids": torch.arange(TRAFFIC_ROWS * world) + 100,
        "traffic_z": [torch.randn(TRAFFIC_ROWS * world, DIM, generator=gen) for _ in range(NUM_LAYERS)],
    }


def make_bank(rank: int = 0, world_size: int = 1) -> MemoryBank:
    return MemoryBank(NUM_LAYERS, SIZE, DIM, rank, world_size, dtype=torch.float16, groups=GROUPS, seed=SEED)


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
    """Every rank enqueues its own rows of each global batch (one rank replays a world's bank
    through ``MemoryBank.reshard`` of its shards, not by refilling)."""
    for split, vectors, ids in problem["enqueues"]:
        rows = rows_of(split, rank, world_size)
        bank.enqueue([v[rows] for v in vectors], ids[rows])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the launcher
    args = parser.parse_args()

    install_counters()  # before deepspeed looks any collective up
    import deepspeed
    import torch.distributed as dist

    from lrcbert.method.negatives import batch_negatives, negative_generator
    from lrcbert.runtime.engine import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    problem = make_problem(world)
    bank = make_bank(rank, world)
    fill(bank, problem, rank, world)
    contents, contents_ids = bank.global_contents()
    shard = {key: value.clone() for key, value in bank.state_dict().items()}  # before sampling

    linear = torch.nn.Linear(IN_FEATURES, NUM_LAYERS * DIM)
    linear.load_state_dict({"weight": problem["weight"], "bias": problem["bias"]})
    engine, *_ = deepspeed.initialize(
        model=linear,
        optimizer=torch.optim.SGD(linear.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": TRAIN_ROWS, "gradient_accumulation_steps": 1,
                "train_batch_size": TRAIN_ROWS * world, "zero_optimization": {"stage": 0}},
    )
    rows = rows_of((TRAIN_ROWS,) * world, rank, world)
    z_s = student_vectors(engine, problem["x"][rows])
    sums, k = bank.negative_distance_sums(z_s, problem["ids"][rows], K)  # sample_step 0
    loss = cos_nce(z_s, [t[rows] for t in problem["teacher"]], sums, k)  # mean over local rows
    engine.backward(loss)  # DeepSpeed averages the gradients over ranks
    weight_grad, bias_grad = linear.weight.grad.clone(), linear.bias.grad.clone()

    # Unequal local batches: per-row sums and the gradient w.r.t. each rank's own vectors.
    rows = rows_of(UNEQUAL_SPLITS[world], rank, world)
    z = [v[rows].clone().requires_grad_(True) for v in problem["unequal_z"]]
    unequal_sums, _ = bank.negative_distance_sums(z, problem["unequal_ids"][rows], K)  # sample_step 1
    torch.stack(unequal_sums).square().sum().backward()

    # Batch negatives: own rows only, widths differ per rank.
    rows = rows_of(BATCH_SPLITS[world], rank, world)
    batch_z = [v[rows].clone().requires_grad_(True) for v in problem["batch_z"]]
    negatives = batch_negatives([layer[rank] for layer in problem["batch_teacher"]], BATCH_K,
                                negative_generator(SEED, 3))
    batch_sums, batch_k = negatives(batch_z)
    torch.stack(batch_sums).square().sum().backward()

    # Traffic of one draw + score (+ backward), one enqueue, one batch-negatives draw + score.
    rows = rows_of((TRAFFIC_ROWS,) * world, rank, world)
    traffic_z = [v[rows].clone().requires_grad_(True) for v in problem["traffic_z"]]
    dist.barrier()
    TAG[0] = "bank_draw_score"
    drawn = bank.draw(problem["traffic_ids"][rows], K, bank.make_generator(99))
    torch.stack(drawn(traffic_z)[0]).sum().backward()
    TAG[0] = "bank_enqueue"
    bank.enqueue([v.detach() for v in traffic_z], problem["traffic_ids"][rows])
    TAG[0] = "batch_draw_score"
    negatives = batch_negatives([v.detach() for v in traffic_z], BATCH_K, negative_generator(SEED, 4))
    torch.stack(negatives(traffic_z)[0]).sum().backward()
    TAG[0] = None

    result = {
        "loss": loss.detach(), "sums": [s.detach() for s in sums],
        "weight_grad": weight_grad, "bias_grad": bias_grad,
        "unequal_sums": [s.detach() for s in unequal_sums], "unequal_grads": [v.grad for v in z],
        "batch_sums": [s.detach() for s in batch_sums], "batch_grads": [v.grad for v in batch_z], "batch_k": batch_k,
        "contents": contents, "contents_ids": contents_ids,
        "shard": shard, "traffic": {tag: by_kind(ops) for tag, ops in COUNTS.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
