"""Bank scoring: a step's first and repeated ``MemoryBank.negative_distance_sums`` call, side by side.

    python bench/bank_scoring.py [--json] [--quick] [--repeats 10]

With gradient perturbation each training step scores its student vectors against the bank
twice (clean and perturbed pass) with one draw of negatives. The first call draws the slots
and sums the normalized bank rows; the second reuses that plan. Each repeat times, back to
back on one bank: a first call (a fresh draw), the repeated call (same generator state), and
the backward through it. Setting of ``bench/step_efficiency.py``'s bank variant: 4 mapped
layers, 1,024 fp16 slots, flatten pooling of 64 tokens x 384 (MiniLM teacher), batch 16, K=15.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import Report, base_parser, median_ms  # noqa: E402
from lrcbert.bank import MemoryBank  # noqa: E402


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats (median)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bank_size", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64 * 384, help="pooled vector size (tokens x teacher width)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_negatives", type=int, default=15)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.bank_size, args.dim = 2, 64, 512
    report = Report("bank_scoring", args)
    torch.manual_seed(0)
    layers, batch, k = args.layers, args.batch_size, args.num_negatives
    bank = MemoryBank(layers, args.bank_size, args.dim, dtype=torch.float16)
    for start in range(0, args.bank_size, batch):
        bank.enqueue([torch.randn(batch, args.dim) for _ in range(layers)], torch.arange(batch) + start)
    ids = torch.arange(batch) + 10 * args.bank_size  # never in the bank
    z = [torch.randn(batch, args.dim, requires_grad=True) for _ in range(layers)]
    report.say(f"{layers} layers x {args.bank_size} fp16 slots x {args.dim} values, batch {batch}, K={k}, "
               f"{torch.get_num_threads()} threads, {args.repeats} repeats")

    def call(step: int) -> float:
        start = time.perf_counter()
        sums, _ = bank.negative_distance_sums(z, ids, k, bank.make_generator(step))
        torch.stack(sums).sum().backward()
        return time.perf_counter() - start

    first, repeated = [], []
    for step in range(args.repeats + 1):  # step 0 warms up
        a, b = call(step), call(step)
        if step:
            first.append(a)
            repeated.append(b)
    ratios = [b / a for a, b in zip(first, repeated)]
    report.data.update(
        layers=layers, bank_size=args.bank_size, dim=args.dim, batch_size=batch, num_negatives=k,
        repeats=args.repeats, first_call_ms=median_ms(first), repeated_call_ms=median_ms(repeated),
        repeated_over_first=statistics.median(ratios),
        per_repeat_ms=[[round(1e3 * a, 2), round(1e3 * b, 2)] for a, b in zip(first, repeated)])
    report.say(f"first call (draw + sums + backward): {median_ms(first):.1f} ms; repeated call (same draw): "
               f"{median_ms(repeated):.1f} ms; repeated / first {statistics.median(ratios):.3f} "
               f"(median of per-repeat ratios)")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
