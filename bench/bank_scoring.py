"""Bank scoring: one step's draw and its two scored passes, against two fresh draws, side by side.

    python bench/bank_scoring.py [--json] [--quick] [--repeats 10]

With gradient perturbation each training step scores its student vectors against the bank
twice (clean and perturbed pass) with one draw of negatives. ``MemoryBank.draw`` draws the
slots and sums the normalized bank rows once; the ``BankNegatives`` it returns scores each
pass (student side only). Each repeat times, back to back on one bank: the draw, the clean
pass (scoring + backward), the perturbed pass (the same draw), and, as the reference a
caller without the draw API would pay, two passes each with a fresh draw. Setting of
``bench/step_efficiency.py``'s bank variant: 4 mapped layers, 1,024 fp16 slots, flatten
pooling of 64 tokens x 384 (MiniLM teacher), batch 16, K=15.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench.common import Report, base_parser, median_ms  # noqa: E402
from lrcbert.method.bank import MemoryBank  # noqa: E402


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

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def score(negatives):
        sums, _ = negatives(z)
        torch.stack(sums).sum().backward()

    rows = {"draw": [], "clean_pass": [], "perturbed_pass": [], "step": [], "two_fresh_draws": []}
    for step in range(args.repeats + 1):  # step 0 warms up
        held = {}
        draw = timed(lambda: held.setdefault("n", bank.draw(ids, k, bank.make_generator(step))))
        clean = timed(lambda: score(held["n"]))
        perturbed = timed(lambda: score(held["n"]))
        fresh = sum(timed(lambda: score(bank.draw(ids, k, bank.make_generator(step)))) for _ in range(2))
        if step:
            for name, value in (("draw", draw), ("clean_pass", clean), ("perturbed_pass", perturbed),
                                ("step", draw + clean + perturbed), ("two_fresh_draws", fresh)):
                rows[name].append(value)
    ratios = [a / b for a, b in zip(rows["step"], rows["two_fresh_draws"])]
    report.data.update(
        layers=layers, bank_size=args.bank_size, dim=args.dim, batch_size=batch, num_negatives=k,
        repeats=args.repeats, **{f"{name}_ms": median_ms(values) for name, values in rows.items()},
        step_over_two_fresh_draws=statistics.median(ratios),
        per_repeat_ms={name: [round(1e3 * v, 2) for v in values] for name, values in rows.items()})
    report.say(f"draw {median_ms(rows['draw']):.1f} ms, clean pass {median_ms(rows['clean_pass']):.1f} ms, "
               f"perturbed pass (same draw) {median_ms(rows['perturbed_pass']):.1f} ms: step "
               f"{median_ms(rows['step']):.1f} ms; two passes with fresh draws {median_ms(rows['two_fresh_draws']):.1f}"
               f" ms; step / two fresh draws {statistics.median(ratios):.3f} (median of per-repeat ratios)")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
