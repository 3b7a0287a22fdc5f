"""Collect a GLUE sweep into the paper's table and the leaderboard zip.

    python finetune/collect.py runs/general/glue --out runs/general/glue_table
    python finetune/collect.py runs/general/glue --out runs/general/glue_table --zip runs/glue.zip --glue_dir GLUE

Reads every finished run of a sweep (``SWEEP/TASK/lrRATE/seedSEED/eval_results.json``, as
``slurm/glue_sweep.sbatch`` writes them; a ``SWEEP/TASK/lrRATE`` run without seed folders counts
as one seed) and writes ``glue_table.md`` and ``glue_table.json`` under ``--out``:

* per task, the learning rate with the best dev mean over seeds (ties: the smaller rate) of
  the task score, the mean of its official metrics over its dev splits (MNLI: matched and
  mismatched accuracy; MRPC/QQP: F1 and accuracy; STS-B: Pearson and Spearman);
* at that rate, every official metric as mean +- std over seeds, MNLI matched and
  mismatched apart, with the grid's other rates' means beside it;
* the average of the task scores over the tasks found (which ones is said).

``--zip`` assembles the leaderboard archive from the chosen runs (per task, the seed with the
best dev score at the chosen rate): one prediction file per test split (CoLA.tsv ... WNLI.tsv,
MNLI-m.tsv, MNLI-mm.tsv and AX.tsv from the MNLI run). It refuses, with one line naming what
is missing, to write an archive without every file the leaderboard needs; with ``--glue_dir``
it also checks that each file has a row for every test example (a run made with
``--max_test_samples`` does not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrcbert.data import glue  # noqa: E402
from lrcbert.errors import UserError, exit_on_user_error  # noqa: E402
from lrcbert.files import write_atomic  # noqa: E402

LEADERBOARD_FILES = ("CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
                     "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv")
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
_LR = re.compile(r"^lr(.+)$")
_SEED = re.compile(r"^seed(-?\d+)$")


def find_runs(sweep: Path) -> list[dict]:
    """Every finished run under ``sweep``: task, lr, seed, dev metrics, run folder."""
    runs = []
    for task_dir in sorted(p for p in sweep.iterdir() if p.is_dir()):
        try:
            task = glue.get_task(task_dir.name)
        except UserError:
            continue  # not a task folder (logs, tables)
        for lr_dir in sorted(p for p in task_dir.iterdir() if p.is_dir() and _LR.match(p.name)):
            seed_dirs = [p for p in lr_dir.iterdir() if p.is_dir() and _SEED.match(p.name)]
            for run in seed_dirs or [lr_dir]:
                results = run / "eval_results.json"
                if not results.is_file():
                    continue  # unfinished or failed: left out (counted in the report)
                data = json.loads(results.read_text())
                args = json.loads((run / "args.json").read_text()) if (run / "args.json").is_file() else {}
                seed = int(_SEED.match(run.name).group(1)) if run is not lr_dir else int(args.get("seed", 0))
                dev = {split: data[split] for split in task.dev_splits if split in data}
                if len(dev) != len(task.dev_splits):
                    raise UserError(f"{results} lacks dev split(s) {set(task.dev_splits) - set(dev)}")
                runs.append({"task": task.name, "lr": float(_LR.match(lr_dir.name).group(1)), "lr_name":
                             lr_dir.name[2:], "seed": seed, "dev": dev, "dir": str(run),
                             "score": task_score(task, dev)})
    return runs


def task_score(task: glue.TaskSpec, dev: dict[str, dict[str, float]]) -> float:
    """The mean of the task's official metrics over its dev splits."""
    return statistics.fmean(dev[split][m] for split in task.dev_splits for m in task.metrics)


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def collect(runs: list[dict]) -> dict:
    tasks = {}
    for name in sorted({r["task"] for r in runs}, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99):
        task = glue.get_task(name)
        mine = [r for r in runs if r["task"] == name]
        grid = {}
        for r in mine:
            grid.setdefault(r["lr"], []).append(r)
        means = {lr: statistics.fmean(r["score"] for r in rs) for lr, rs in grid.items()}
        best_lr = max(sorted(means), key=lambda lr: means[lr])  # sorted + max: ties keep the smaller rate
        chosen = sorted(grid[best_lr], key=lambda r: r["seed"])
        metrics = {split: {m: _mean_std([r["dev"][split][m] for r in chosen]) for m in task.metrics}
                   for split in task.dev_splits}
        best_run = max(chosen, key=lambda r: (r["score"], -r["seed"]))
        tasks[name] = {"glue_name": task.glue_name, "lr": best_lr, "seeds": [r["seed"] for r in chosen],
                       "metrics": metrics, "score": _mean_std([r["score"] for r in chosen]),
                       "grid": {f"{lr:g}": {"mean_score": means[lr], "seeds": sorted(r["seed"] for r in grid[lr])}
                                for lr in sorted(grid)},
                       "chosen_run": best_run["dir"], "chosen_seed": best_run["seed"]}
    average = statistics.fmean(t["score"]["mean"] for t in tasks.values()) if tasks else float("nan")
    return {"tasks": tasks, "average": average, "average_over": list(tasks), "runs": len(runs)}


def _split_label(task: glue.TaskSpec, split: str) -> str:
    if len(task.dev_splits) == 1:
        return task.glue_name
    return f"{task.glue_name}-{'m' if split.endswith('_matched') else 'mm'}"


def to_markdown(table: dict, sweep: str) -> str:
    header, values, details = [], [], []
    for name, t in table["tasks"].items():
        task = glue.get_task(name)
        for split, per_metric in t["metrics"].items():
            header.append(f"{_split_label(task, split)} ({'/'.join(task.metrics)})")
            values.append("/".join(f"{100 * v['mean']:.1f}+-{100 * v['std']:.1f}" for v in per_metric.values()))
        grid = ", ".join(f"{lr}: {100 * g['mean_score']:.1f} (seeds {g['seeds']})" for lr, g in t["grid"].items())
        details.append(f"- {task.glue_name}: lr {t['lr']:g} chosen on the dev mean over seeds {t['seeds']}; grid: "
                       f"{grid}; leaderboard run: {t['chosen_run']}")
    header.append("average")
    values.append(f"{100 * table['average']:.1f}")
    lines = [f"GLUE dev results of the sweep {sweep} ({table['runs']} finished runs): mean +- std over seeds "
             "at each task's chosen learning rate, x100.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(values) + " |", "",
             f"Average: mean of each task's score (its official metrics over its dev splits averaged) over "
             f"{', '.join(glue.get_task(n).glue_name for n in table['average_over'])}.", "", *details]
    return "\n".join(lines) + "\n"


def leaderboard_files(table: dict, glue_dir: str | None) -> dict[str, Path]:
    """Leaderboard file name -> the chosen run's prediction file; UserError naming what is missing."""
    files, problems = {}, []
    for name, t in table["tasks"].items():
        task = glue.get_task(name)
        for split in task.test_split_names:
            file_name = task.submission_file(split)
            path = Path(t["chosen_run"]) / "submission" / file_name
            if not path.is_file():
                continue
            if glue_dir:
                rows = len(path.read_text(encoding="utf-8").splitlines()) - 1
                expected = len(glue.load_examples(task, Path(glue_dir) / task.glue_name, split))
                if rows != expected:
                    problems.append(f"{file_name} has {rows} rows, the test split {expected}")
                    continue
            files[file_name] = path
    missing = [f for f in LEADERBOARD_FILES if f not in files]
    if missing or problems:
        raise UserError("not writing a leaderboard zip: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + problems))
    return files


def write_zip(files: dict[str, Path], path: str) -> None:
    tmp = f"{path}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in LEADERBOARD_FILES:
            z.write(files[name], arcname=name)
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweep", help="the sweep's output folder (SWEEP_OUT: TASK/lrRATE/seedSEED/...)")
    p.add_argument("--out", default=None, help="where glue_table.md/.json go (default: the sweep folder)")
    p.add_argument("--zip", default=None, help="also write the leaderboard zip here")
    p.add_argument("--glue_dir", default=None, help="GLUE root: check each prediction file's row count")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    sweep = Path(args.sweep)
    if not sweep.is_dir():
        raise UserError(f"sweep folder not found: {sweep}")
    runs = find_runs(sweep)
    if not runs:
        raise UserError(f"no finished run (TASK/lrRATE[/seedSEED]/eval_results.json) under {sweep}")
    table = collect(runs)
    out = Path(args.out or sweep)
    out.mkdir(parents=True, exist_ok=True)
    text = to_markdown(table, str(sweep))
    write_atomic(str(out / "glue_table.md"), text)
    write_atomic(str(out / "glue_table.json"), json.dumps(table, indent=2) + "\n")
    print(text)
    if args.zip:
        write_zip(leaderboard_files(table, args.glue_dir), args.zip)
        print(f"wrote {args.zip} ({', '.join(LEADERBOARD_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
