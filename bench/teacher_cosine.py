"""How alike a teacher's sentences are, layer by layer: the COS-NCE floor of a collapsed student.

For each teacher layer a student of ``--student_layers`` layers is mapped to (the default map,
floor(i * N / M)), the mean cosine c between the pooled vectors of different training sentences,
and ``2 - sqrt(c)``: about what COS-NCE charges a student that gives every input the teacher's
mean direction (docs/METHOD_NOTES.md, "What the collapse watch shows on CoLA"). A run whose
``loss/cos_layerI`` stays near that figure has learned little beyond the average sentence there.

    python bench/teacher_cosine.py --task cola --data_dir ../shared/data/GLUE/CoLA \
        --teacher bench/results/quality_1204_cola/cola/teacher/lr0.0001/seed1/model
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lrcbert.data import glue  # noqa: E402
from lrcbert.method.layer_map import uniform_layer_map  # noqa: E402
from lrcbert.method.losses import mean_pairwise_cosine  # noqa: E402


def teacher_cosines(teacher: str, task, data_dir: str, examples: int, max_seq_length: int,
                    student_layers: int) -> tuple[int, float, list[tuple[int, int, str, float]]]:
    """(examples read, mean length in tokens, [(student layer, teacher layer, pooling, c)])."""
    from transformers import AutoModel, AutoTokenizer

    ex = glue.read_split(task, data_dir, "train")
    n = min(examples, len(ex.text_a))
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModel.from_pretrained(teacher).eval()
    enc = tok(ex.text_a[:n], ex.text_b[:n] if ex.text_b else None, truncation=True,
              max_length=max_seq_length, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    rows = []
    for i, t in uniform_layer_map(student_layers, model.config.num_hidden_layers):
        for mode in ("flatten", "mean"):
            rows.append((i, t, mode, mean_pairwise_cosine(hidden[t], enc["attention_mask"], mode).item()))
    return n, enc["attention_mask"].sum(1).float().mean().item(), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--data_dir", required=True, help="the task's GLUE folder")
    p.add_argument("--teacher", required=True, help="a fine-tuned teacher (Hugging Face folder)")
    p.add_argument("--examples", type=int, default=128, help="the first N training examples")
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--student_layers", type=int, default=4)
    args = p.parse_args(argv)
    task = glue.get_task(args.task)
    n, length, rows = teacher_cosines(args.teacher, task, args.data_dir, args.examples, args.max_seq_length,
                                      args.student_layers)
    print(f"{task.name}: {n} training examples, {length:.1f} tokens on average, seq {args.max_seq_length}")
    print("| student layer | teacher layer | pooling | mean pairwise cosine c | collapsed floor 2 - sqrt(c) |")
    print("|---|---|---|---:|---:|")
    for i, t, mode, c in rows:
        print(f"| {i} | {t} | {mode} | {c:.3f} | {2 - math.sqrt(max(c, 0.0)):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
