"""Step efficiency: what one LRC-BERT task-distillation step costs, part by part.

    python bench/step_efficiency.py [--json] [--quick] [--teacher minilm|bert-base]

One process, no launcher, the library's own pieces composed as ``finetune/glue.py``
composes a step (the teacher forward, ``LRCObjective`` with batch negatives, its loss step
``LRCObjective.step`` / ``perturbation_delta``, AdamW from ``lrcbert.runtime.engine.build_optimizer``)
in the task stage's default add mode (the clean and the perturbed loss trained on: one backward
of the clean loss gives dL/de and its parameter gradients, carried into the backward of the
perturbed loss, as finetune/glue.py does under ZeRO 0-2), the
same in the paper's replace mode, and a variant whose COS-NCE negatives come from the
``MemoryBank`` (as ``pretrain/general_distill.py`` draws them, in replace mode: one
``MemoryBank.draw`` scores both passes), with the enqueue after the step.

Measured interleaved in every repeat, on real SST-2 training sentences:
- the whole step, uninstrumented (the library's ``LRCObjective.step``), per variant;
- the same step with a timer around each phase (exclusive times: the bank's scoring is
  taken out of the loss phase it runs in);
- the reference: teacher forward + 2 x (student forward + backward with a plain
  cross-entropy loss), the least any two-pass distillation step must do.
Ratio = median over steps of (whole step / the reference timed in the same iteration); the
ratio of the two medians is reported beside it. Goal: at most 1.10.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import statistics  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig  # noqa: E402

from bench.common import SHARED_DATA, Report, base_parser, offline_teacher_dir, plot_bars  # noqa: E402
from lrcbert.data import glue  # noqa: E402
from lrcbert.data.batches import collate, encode  # noqa: E402
from lrcbert.method.bank import MemoryBank  # noqa: E402
from lrcbert.method.layer_map import uniform_layer_map  # noqa: E402
from lrcbert.method.losses import LossWeights  # noqa: E402
from lrcbert.method.negatives import negative_generator  # noqa: E402
from lrcbert.method.objective import LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.method.perturb import PerturbConfig, carry_gradients, perturbation_delta, shift_along  # noqa: E402
from lrcbert.models import DistillStudent, StudentShape, count_parameters, freeze, student_config, with_labels  # noqa: E402
from lrcbert.runtime.engine import build_optimizer  # noqa: E402

GOAL_RATIO = 1.10
STAGE2 = LossWeights(1.0, 1.0, 3.0)  # every term active: the dearer of the two stages
EPSILON = 1e-5
PHASES = ("teacher_forward", "teacher_vectors_and_negatives", "student_forward_clean", "losses_clean",
          "perturbation_grad", "student_forward_perturbed", "losses_perturbed", "backward", "optimizer",
          "bank_scoring", "bank_enqueue")


@torch.no_grad()
def teacher_forward(teacher, batch):
    """The frozen teacher's (logits, hidden states), timed apart from pooling its vectors."""
    out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"], output_hidden_states=True, return_dict=True)
    return out.logits, out.hidden_states


class Phases:
    """Exclusive wall time per named phase (an inner phase's time is not counted in the outer one)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._stack: list[list] = []

    @contextmanager
    def __call__(self, name: str):
        frame = [name, time.perf_counter(), 0.0]  # name, start, time spent in inner phases
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.times[name] = self.times.get(name, 0.0) + elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed


def build(args):
    """Teacher (frozen, with a head), the student module, objective, optimizer, batches."""
    labels = ["negative", "positive"]
    tokenizer = AutoTokenizer.from_pretrained(offline_teacher_dir())
    torch.manual_seed(0)
    if args.teacher == "minilm":  # the real pretrained MiniLM encoder (6 x 384) with a new head
        teacher_cfg = AutoConfig.from_pretrained(offline_teacher_dir())
        teacher = AutoModelForSequenceClassification.from_pretrained(offline_teacher_dir(),
                                                                     config=with_labels(teacher_cfg, labels))
    else:
        teacher_cfg = BertConfig(vocab_size=tokenizer.vocab_size)
        teacher = AutoModelForSequenceClassification.from_config(with_labels(teacher_cfg, labels))
    teacher = freeze(teacher)
    student_hf = AutoModelForSequenceClassification.from_config(
        with_labels(student_config(teacher_cfg, StudentShape()), labels))
    layer_map = uniform_layer_map(student_hf.config.num_hidden_layers, teacher_cfg.num_hidden_layers)
    module = DistillStudent(student_hf, [s for s, _ in layer_map], teacher_cfg.hidden_size).train()
    objective = LRCObjective(layer_map, ObjectiveConfig("flatten", "cos_nce", 15, 1.1, False))
    optimizer = build_optimizer(module, 1e-4, 0.01)
    task = glue.get_task("sst2")
    train = glue.read_split(task, SHARED_DATA / "GLUE" / "SST-2", "train")
    n = args.batch_size * (args.repeats + args.warmup)
    encoded = encode(tokenizer, train.text_a[:n], None, train.labels[:n], list(range(n)), args.max_seq_length)
    batches = [collate(encoded, range(i, i + args.batch_size), tokenizer.pad_token_id)
               for i in range(0, n, args.batch_size)]
    bank_dim = teacher_cfg.hidden_size * args.max_seq_length
    bank = MemoryBank(len(layer_map), args.bank_size, bank_dim, dtype=torch.float16, seed=0)
    gen = torch.Generator().manual_seed(1)
    for start in range(0, args.bank_size, args.batch_size):  # fill with ids the batches never use
        fake = [torch.randn(args.batch_size, bank_dim, generator=gen) for _ in layer_map]
        bank.enqueue(fake, torch.arange(start, start + args.batch_size) + 10**9)
    return teacher, module, objective, optimizer, batches, bank, bank_dim, teacher_cfg


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=["minilm", "bert-base"], default="minilm",
                        help="minilm: the offline pretrained 6x384 MiniLM; bert-base: its config, random weights")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per step (paper: 16)")
    parser.add_argument("--max_seq_length", type=int, default=64, help="truncation length (SST-2 fits in 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--bank_size", type=int, default=1024, help="memory bank slots (K = 15 negatives)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_seq_length, args.repeats, args.warmup, args.bank_size = 4, 32, 1, 1, 32
    report = Report("step_efficiency", args)
    teacher, module, objective, optimizer, batches, bank, bank_dim, teacher_cfg = build(args)
    warmup = args.warmup
    student_hf = module.model
    k = objective.config.num_negatives
    report.say(f"teacher {args.teacher} ({teacher_cfg.num_hidden_layers}x{teacher_cfg.hidden_size}, "
               f"{count_parameters(teacher) / 1e6:.1f}M), student {count_parameters(student_hf) / 1e6:.1f}M; "
               f"batch {args.batch_size}, max_seq_length {args.max_seq_length}, bank {args.bank_size} slots, "
               f"K={k}, {torch.get_num_threads()} threads")

    def negatives_for(batch, step, t_vectors, use_bank, ph):
        if not use_bank:
            return objective.batch_negatives(t_vectors, negative_generator(0, step))
        with ph("bank_scoring"):  # the draw: slots, counts and direction sums, once per step
            draw = bank.draw(batch["rows"], k, bank.make_generator(step))

        def from_bank(student_vectors):
            with ph("bank_scoring"):  # each pass: the student side only
                return draw(student_vectors)
        return from_bank

    params = [p for p in module.parameters() if p.requires_grad]  # whole tensors, as under ZeRO 0-2

    def whole_step(batch, step, use_bank, mode):
        """The recipe's step, no timers: the library's loss step does steps 1-4."""
        t = objective.teacher(teacher, batch)
        negatives = (bank.draw(batch["rows"], k, bank.make_generator(step)) if use_bank
                     else objective.batch_negatives(t.vectors, negative_generator(0, step)))
        loss, _ = objective.step(module, batch, t, STAGE2, negatives, probe=module, params=params,
                                 perturb=PerturbConfig(enabled=True, epsilon=EPSILON, mode=mode, relative=False))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_bank:
            bank.enqueue(t.vectors, batch["rows"])

    def phased_step(batch, step, use_bank, mode, ph):
        """The same step with a timer around each phase (add mode keeps the clean graph and
        backpropagates both losses)."""
        with ph("teacher_forward"):
            t_logits, t_hidden = teacher_forward(teacher, batch)
        mask = batch["attention_mask"]
        with ph("teacher_vectors_and_negatives"):
            t_vectors = objective.teacher_vectors(t_hidden, mask)
            negatives = negatives_for(batch, step, t_vectors, use_bank, ph)

        def loss_of(delta, tag):
            with ph(f"student_forward_{tag}"):
                s_logits, _, s_embed, projected = module(batch["input_ids"], mask, batch["token_type_ids"], delta)
            with ph(f"losses_{tag}"):
                total, _ = objective(STAGE2, mask, projected, t_hidden, t_vectors, negatives, s_logits, t_logits,
                                     batch["labels"])
            return total, s_embed

        clean, embeddings = loss_of(None, "clean")
        with ph("perturbation_grad"):  # add mode: dL/de and the clean parameter gradients in one backward
            if mode == "add":
                grads = torch.autograd.grad(clean, [embeddings, *params])
                delta = shift_along(grads[0], embeddings, EPSILON)
            else:
                delta = perturbation_delta(clean, embeddings, EPSILON)
        loss, _ = loss_of(delta, "perturbed")
        if mode == "add":
            loss = loss + clean.detach() + carry_gradients(params, list(grads[1:]))
        with ph("backward"):
            loss.backward()
        with ph("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if use_bank:
            with ph("bank_enqueue"):
                bank.enqueue(t_vectors, batch["rows"])

    def reference(batch, ph):
        """Teacher forward + 2 x (student forward + backward, plain cross-entropy)."""
        with ph("teacher_forward"):
            teacher_forward(teacher, batch)
        for i in range(2):
            with ph(f"student_fwd_bwd_{i}"):
                out = student_hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch["token_type_ids"], labels=batch["labels"])
                out.loss.backward()
        with ph("optimizer"):  # not part of the reference sum; reported beside it
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # name: (bank negatives?, perturbation mode). The task stage (finetune/glue.py) draws batch
    # negatives in add mode, its default; general distillation draws from the bank in replace mode
    variants = {"batch_negatives": (False, "add"), "batch_negatives_replace": (False, "replace"),
                "bank_negatives": (True, "replace")}
    samples = {name: {"whole": [], "phased": [], "phases": []} for name in variants}
    samples["reference"] = {"total": [], "parts": []}
    for step, batch in enumerate(batches):
        timed = step >= warmup
        ref = Phases()
        reference(batch, ref)
        if timed:
            samples["reference"]["total"].append(sum(v for k_, v in ref.times.items() if k_ != "optimizer"))
            samples["reference"]["parts"].append(ref.times)
        for name, (use_bank, mode) in variants.items():
            start = time.perf_counter()
            whole_step(batch, step, use_bank, mode)
            whole = time.perf_counter() - start
            ph = Phases()
            start = time.perf_counter()
            phased_step(batch, step, use_bank, mode, ph)
            if timed:
                samples[name]["whole"].append(whole)
                samples[name]["phased"].append(time.perf_counter() - start)
                samples[name]["phases"].append(ph.times)

    med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    ref_ms = med(samples["reference"]["total"])
    ref_opt = [r + p["optimizer"] for r, p in zip(samples["reference"]["total"], samples["reference"]["parts"])]
    ref_opt_ms = med(ref_opt)
    ref_parts = {key: med([p[key] for p in samples["reference"]["parts"]])
                 for key in samples["reference"]["parts"][0]}
    report.data.update({
        "teacher": {"kind": args.teacher, "layers": teacher_cfg.num_hidden_layers, "hidden": teacher_cfg.hidden_size,
                    "parameters": count_parameters(teacher)},
        "student": {"config": "4x312, 1200, 12 heads", "parameters": count_parameters(student_hf)},
        "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "bank_size": args.bank_size,
        "num_negatives": k, "repeats": args.repeats,
        "reference_ms": ref_ms, "reference_parts_ms": ref_parts, "reference_plus_optimizer_ms": ref_opt_ms,
        "reference_formula": "teacher_forward + 2 x (student forward + backward)",
        "goal_ratio": GOAL_RATIO, "variants": {}})
    report.say(f"reference (teacher forward + 2 x student fwd+bwd): {ref_ms:.1f} ms  "
               + ", ".join(f"{k_}: {v:.1f}" for k_, v in ref_parts.items()))
    for name in variants:
        s = samples[name]
        phases = {p: med([t.get(p, 0.0) for t in s["phases"]]) for p in PHASES if any(p in t for t in s["phases"])}
        whole_ms = med(s["whole"])
        ratios = [w / r for w, r in zip(s["whole"], samples["reference"]["total"])]
        ratio = statistics.median(ratios)  # paired: each step against the reference timed next to it
        entry = {"negatives": "bank" if variants[name][0] else "batch", "perturb_mode": variants[name][1],
                 "whole_step_ms": whole_ms, "phased_step_ms": med(s["phased"]), "phases_ms": phases,
                 "ratio": ratio, "ratio_of_medians": whole_ms / ref_ms,
                 "ratio_to_reference_plus_optimizer": statistics.median(
                     w / r for w, r in zip(s["whole"], ref_opt)),
                 "ratio_per_step": ratios, "goal_met": ratio <= GOAL_RATIO}
        report.data["variants"][name] = entry
        report.say(f"{name}: whole step {whole_ms:.1f} ms, ratio to reference x{entry['ratio']:.3f} "
                   f"(median of per-step ratios; ratio of medians x{entry['ratio_of_medians']:.3f}) "
                   f"(goal <= {GOAL_RATIO}: {'met' if entry['goal_met'] else 'missed'}); "
                   f"to reference + one optimizer step x{entry['ratio_to_reference_plus_optimizer']:.3f}")
        for p, v in phases.items():
            report.say(f"    {p:>30}: {v:8.1f} ms")
    # the headline: the task-distillation step as finetune/glue.py runs it (batch negatives)
    report.data["ratio"] = report.data["variants"]["batch_negatives"]["ratio"]
    names = list(variants)
    title = f"One step, ms (teacher {args.teacher}, batch {args.batch_size}); reference {ref_ms:.0f} ms"
    series = {n: [report.data["variants"][n]["phases_ms"].get(p, 0.0) for p in PHASES] for n in names}
    report.finish(plot=lambda: plot_bars(report.path(".png"), title, [p.replace("_", "\n", 1) for p in PHASES],
                                         series, "ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
