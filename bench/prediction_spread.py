"""Prediction spread: does a regression student predict, or sit near the label mean?

    python bench/prediction_spread.py --task stsb --models TEACHER_DIR STUDENT_DIR ... \
        [--data_dir ../shared/data/GLUE/STS-B] [--max_seq_length 64] [--json]

For each exported model (``OUTPUT_DIR/model`` of ``finetune/glue.py``) on the task's dev set:
the mean and standard deviation of its predictions against the labels', and the Pearson
correlation. A student whose predictions spread far less than the labels (and the teacher's)
underfits: it has learned the mean, not the ranking. Regression tasks only (STS-B).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.common import SHARED_DATA, Report, base_parser  # noqa: E402
from lrcbert.data import glue  # noqa: E402
from lrcbert.inference import load_classifier_for_inference, predict_logits  # noqa: E402


def predictions(model_dir: str, examples: glue.Examples, max_seq_length: int) -> np.ndarray:
    """(N,) predictions in input order, through the project's inference path (as ``finetune/score.py``)."""
    from transformers import AutoTokenizer

    model = load_classifier_for_inference(model_dir)
    logits = predict_logits(model, AutoTokenizer.from_pretrained(model_dir), examples.text_a, examples.text_b,
                            max_seq_length)
    return logits.reshape(-1).numpy()


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", default="stsb", help="a GLUE regression task")
    parser.add_argument("--models", nargs="+", required=True, help="model directories (Hugging Face format)")
    parser.add_argument("--data_dir", default=None, help="the task's folder (default: ../shared/data/GLUE/<task>)")
    parser.add_argument("--max_seq_length", type=int, default=64, help="as the models were trained")
    parser.add_argument("--max_eval_samples", type=int, default=0, help="first N dev examples (0: all)")
    args = parser.parse_args(argv)
    task = glue.get_task(args.task)
    if not task.is_regression:
        parser.error(f"--task {args.task} is not a regression task")
    for d in args.models:
        if not os.path.isfile(os.path.join(d, "config.json")):
            parser.error(f"--models: {d} is not a Hugging Face model directory (no config.json)")
    data_dir = args.data_dir or str(SHARED_DATA / "GLUE" / task.glue_name)
    examples = glue.load_examples(task, data_dir, "dev", 16 if args.quick else args.max_eval_samples)
    labels = np.asarray(examples.labels, dtype=np.float64)
    report = Report("prediction_spread", args)
    report.data.update({"task": task.name, "dev_examples": len(labels),
                        "labels": {"mean": float(labels.mean()), "std": float(labels.std())}, "models": {}})
    report.say(f"{task.name} dev, {len(labels)} examples: labels mean {labels.mean():.2f}, std {labels.std():.3f}")
    for d in args.models:
        p = predictions(d, examples, args.max_seq_length).astype(np.float64)
        row = {"mean": float(p.mean()), "std": float(p.std()), "pearson": float(np.corrcoef(p, labels)[0, 1])}
        report.data["models"][d] = row
        report.say(f"  {d}: predictions mean {row['mean']:.2f}, std {row['std']:.3f} "
                   f"({row['std'] / labels.std():.2f} of the labels'), Pearson {row['pearson']:.4f}")
    report.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
