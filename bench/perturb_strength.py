"""Perturbation strength: how much one gradient step of size epsilon raises the loss, next to dropout noise.

    python bench/perturb_strength.py --teacher TEACHER_DIR [--json] [--quick]

The default student (random init, 4L-312) against a fine-tuned SST-2 teacher, real SST-2
training sentences (seq 64, batch 16), the full loss (1:1:3, COS-NCE with K=15 batch
negatives). Per batch: the clean loss L(e) under dropout; the rise L(e + delta) - L(e) with
the same dropout masks, for relative radii (a share of each sentence's embedding norm over its
real tokens) and for the old absolute radius 1.0; and the dropout noise, the standard
deviation of L(e) over fresh masks. A radius whose rise is far above the dropout noise makes
the perturbed pass a different problem rather than a smoothing of the clean one.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import SHARED_DATA, Report, base_parser  # noqa: E402
from lrcbert.data import glue  # noqa: E402
from lrcbert.data.batches import collate, encode  # noqa: E402
from lrcbert.data.text import load_tokenizer  # noqa: E402
from lrcbert.method.layer_map import uniform_layer_map  # noqa: E402
from lrcbert.method.losses import LossWeights  # noqa: E402
from lrcbert.method.objective import LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.method.perturb import perturbation_delta  # noqa: E402
from lrcbert.models import (DistillStudent, StudentShape, build_student, load_config, load_teacher,  # noqa: E402
                            student_config)

RELATIVE = (0.001, 0.003, 0.01, 0.03, 0.1)
ABSOLUTE = (1.0,)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a teacher fine-tuned on SST-2 (HF dir)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--noise_draws", type=int, default=6, help="dropout masks per batch for the noise")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.noise_draws = 2, 3
    report = Report("perturb_strength", args)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.teacher)
    teacher_cfg = load_config(args.teacher, "teacher")
    teacher = load_teacher(args.teacher, task_head=True)
    task = glue.get_task("sst2")
    student_hf = build_student(student_config(teacher_cfg, StudentShape()), task_head=True,
                               label_names=list(task.label_names))
    layer_map = uniform_layer_map(student_hf.config.num_hidden_layers, teacher_cfg.num_hidden_layers)
    module = DistillStudent(student_hf, [s for s, _ in layer_map], teacher_cfg.hidden_size).train()
    objective = LRCObjective(layer_map, ObjectiveConfig(num_negatives=15))
    weights = LossWeights(1.0, 1.0, 3.0)
    ex = glue.load_examples(task, str(SHARED_DATA / "GLUE" / "SST-2"), "train", 16 * args.batches)
    data = encode(tokenizer, ex.text_a, None, ex.labels, ex.index, 64)
    rows = {"clean_loss": [], "dropout_noise": [], **{f"rise_rel_{e:g}": [] for e in RELATIVE},
            **{f"rise_abs_{e:g}": [] for e in ABSOLUTE}}
    for b in range(args.batches):
        batch = collate(data, range(16 * b, 16 * b + 16), tokenizer.pad_token_id)
        mask = batch["attention_mask"]
        t = objective.teacher(teacher, batch)
        negatives = objective.batch_negatives(t.vectors, torch.Generator().manual_seed(b))

        def loss(delta=None):
            logits, _, embeddings, projected = module(batch["input_ids"], mask, batch["token_type_ids"], delta)
            total, _ = objective(weights, mask, projected, t.hidden, t.vectors, negatives, logits, t.logits,
                                 batch["labels"])
            return total, embeddings

        noise = []
        for _ in range(args.noise_draws):
            with torch.no_grad():
                noise.append(float(loss()[0]))
        rows["dropout_noise"].append(statistics.stdev(noise))
        for relative, radii in ((True, RELATIVE), (False, ABSOLUTE)):
            for eps in radii:
                state = torch.get_rng_state()
                clean, embeddings = loss()
                delta = perturbation_delta(clean, embeddings, eps, attention_mask=mask, relative=relative)
                torch.set_rng_state(state)  # the same dropout masks
                with torch.no_grad():
                    perturbed = float(loss(delta)[0])
                rows[f"rise_{'rel' if relative else 'abs'}_{eps:g}"].append(perturbed - float(clean.detach()))
                if relative and eps == RELATIVE[0]:
                    rows["clean_loss"].append(float(clean.detach()))
    means = {name: statistics.fmean(values) for name, values in rows.items()}
    noise = means["dropout_noise"]
    report.data.update(batches=args.batches, noise_draws=args.noise_draws, mean=means,
                       rise_over_dropout_noise={k: v / noise for k, v in means.items() if k.startswith("rise")})
    report.say(f"clean loss {means['clean_loss']:.3f}, dropout noise (std over masks) {noise:.4f}")
    for name, value in means.items():
        if name.startswith("rise"):
            report.say(f"{name}: loss rise {value:+.4f} = {value / noise:.1f} x the dropout noise")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
