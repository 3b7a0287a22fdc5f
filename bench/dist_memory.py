"""One rank of ``bench/memory.py``'s runs (started by the ``deepspeed`` launcher, CPU ranks, gloo).

    deepspeed --num_gpus W bench/dist_memory.py --ds_config ds_configs/z2.json --out_dir DIR

Trains the default student (DistillStudent: 4x312 plus projections to the teacher width; a
2x64 one with ``--tiny``) for a few steps through ``lrcbert.runtime.engine.Engine``. Each step
draws K negatives per row from the sharded, grouped ``MemoryBank`` (one draw, one scored
pass) and enqueues the step's stand-in teacher vectors, and draws and scores the task
stage's batch negatives (``negatives.batch_negatives``) from the same vectors. Writes
``DIR/rank{R}.json``: peak RSS (VmHWM), RSS before the model, the model states this rank
holds (parameters, gradients, optimizer states) and the bytes of every collective of the
last step by source (``bank``, ``batch_negatives`` or ``engine``: DeepSpeed's own), counted
by ``bench/collectives.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.collectives import COUNTS, TAG, install_counters, nbytes, payload  # noqa: E402


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def tensor_bytes(obj, seen: set) -> int:
    """Bytes of the tensors in an optimizer's state (nested wrappers followed via ``.optimizer``)."""
    total = 0
    for _ in range(4):
        state = getattr(obj, "state", None)
        if isinstance(state, dict) and id(state) not in seen:
            seen.add(id(state))
            for entry in state.values():
                if isinstance(entry, dict):
                    total += sum(nbytes(v) for v in entry.values() if torch.is_tensor(v) and v.dim() > 0)
        obj = getattr(obj, "optimizer", None)
        if obj is None:
            break
    return total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--teacher_width", type=int, default=768, help="projection width d' (BERT-base: 768)")
    parser.add_argument("--bank_size", type=int, default=256)
    parser.add_argument("--bank_groups", type=int, default=None,
                        help="fixed groups of the bank (default: one per rank); the world size must divide it")
    parser.add_argument("--num_negatives", type=int, default=15)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a 2x64 student (smoke test)")
    parser.add_argument("--local_rank", type=int, default=0)  # the launcher passes it
    args = parser.parse_args()
    install_counters()
    TAG[0] = "setup"

    from transformers import AutoModelForSequenceClassification, BertConfig

    from lrcbert.method.bank import MemoryBank
    from lrcbert.method.negatives import batch_negatives, negative_generator
    from lrcbert.runtime import ds_config as dsc
    from lrcbert.runtime import engine as eng
    from lrcbert.runtime.ranks import barrier
    from lrcbert.models import DistillStudent, StudentShape, count_parameters, student_config, with_labels

    eng.init_distributed(600)
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_before_model = rss_kib("VmRSS")
    torch.manual_seed(0)
    shape = StudentShape(2, 64, 128, 4) if args.tiny else StudentShape()
    base = BertConfig(vocab_size=30522, hidden_size=args.teacher_width, num_attention_heads=12)
    student = AutoModelForSequenceClassification.from_config(with_labels(student_config(base, shape), ["a", "b"]))
    layers = list(range(1, shape.num_layers + 1))
    module = DistillStudent(student, layers, args.teacher_width)
    n_params = count_parameters(module)
    settings = dsc.TrainerSettings(args.micro_batch_size, 1, world, 1.0, "fp32")
    ds_config = dsc.resolve_ds_config(args.ds_config, settings)
    optimizer = eng.build_optimizer(module, 1e-4, 0.01)
    engine = eng.Engine(module, optimizer, lambda step: 1.0, ds_config)
    dim = args.max_seq_length * args.teacher_width  # flatten pooling
    bank = MemoryBank(len(layers), args.bank_size, dim, rank, world, torch.float16, groups=args.bank_groups, seed=0)
    gen = torch.Generator().manual_seed(rank)
    b, t = args.micro_batch_size, args.max_seq_length
    for start in range(0, args.bank_size, b * world):  # fill the bank (ids no batch uses)
        ids = torch.arange(start + rank * b, start + rank * b + b) + 10**9
        bank.enqueue([torch.randn(b, dim, generator=gen) for _ in layers], ids)

    engine.train()
    for step in range(args.steps):
        if step == args.steps - 1:
            COUNTS.clear()  # the last step's collectives only
        input_ids = torch.randint(1000, 29000, (b, t), generator=gen)
        mask = torch.ones(b, t, dtype=torch.long)
        rows = torch.arange(b) + rank * b + step * b * world
        teacher_vectors = [torch.randn(b, dim, generator=gen) for _ in layers]  # stands in for the teacher
        TAG[0] = "engine"
        logits, _, _, projected = engine(input_ids, mask, torch.zeros_like(input_ids))
        student_vectors = [p.reshape(b, -1).float() for p in projected]
        TAG[0] = "bank"  # one draw (ids gathered, direction sums exchanged), one local scored pass
        sums, k = bank.negative_distance_sums(student_vectors, rows, args.num_negatives, bank.make_generator(step))
        TAG[0] = "batch_negatives"  # the task stage's source, drawn from the same stand-in vectors
        negatives = batch_negatives(teacher_vectors, args.num_negatives, negative_generator(0, step))
        batch_sums, batch_k = negatives(student_vectors)
        loss = (sum(s.mean() for s in sums) / k + sum(s.mean() for s in batch_sums) / batch_k
                + F.cross_entropy(logits.float(), torch.zeros(b, dtype=torch.long)))
        TAG[0] = "engine"  # neither source has a collective in backward: scoring is local
        engine.backward(loss)
        engine.step()
        TAG[0] = "bank"
        bank.enqueue(teacher_vectors, rows)
        TAG[0] = "engine"

    params_local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * 4
                       for p in module.parameters())
    record = {"rank": rank, "world_size": world, "zero_stage": engine.zero_stage, "parameters": n_params,
              "rss_peak_kib": rss_kib("VmHWM"), "rss_end_kib": rss_kib("VmRSS"),
              "rss_before_model_kib": rss_before_model, "param_bytes_local": params_local,
              "optimizer_state_bytes_local": tensor_bytes(engine.engine.optimizer, set()),
              "bank_bytes_local": bank.bytes_per_rank(), "bank_vector_bytes_local": nbytes(bank.vectors),
              "collective_bytes_last_step": COUNTS,
              "collective_payload_bytes_last_step": {tag: payload(ops) for tag, ops in COUNTS.items()},
              "micro_batch_size": b, "max_seq_length": t,
              "bank_dim": dim, "num_layers_mapped": len(layers), "num_negatives": k,
              "bank_groups": bank.num_groups, "batch_num_negatives": batch_k}
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f, indent=2)
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
