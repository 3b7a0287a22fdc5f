"""finetune/collect.py: a sweep's folders -> the GLUE table and the leaderboard zip.

The folders here are written by hand in the recipe's layout; tests/test_slurm_pretrain.py runs a
real sweep through SLURM and collects it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO

from finetune.collect import LEADERBOARD_FILES, collect, find_runs

TEST_SPLITS = {"cola": ["CoLA.tsv"], "sst2": ["SST-2.tsv"], "mrpc": ["MRPC.tsv"], "stsb": ["STS-B.tsv"],
               "qqp": ["QQP.tsv"], "mnli": ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"], "qnli": ["QNLI.tsv"],
               "rte": ["RTE.tsv"], "wnli": ["WNLI.tsv"]}


def write_run(root, task, lr, seed, dev: dict, files=()):
    run = root / task / f"lr{lr}" / f"seed{seed}"
    (run / "submission").mkdir(parents=True)
    (run / "eval_results.json").write_text(json.dumps({"task": task, "stage": "distill", "steps": 3, **dev}))
    (run / "args.json").write_text(json.dumps({"seed": seed, "learning_rate": float(lr), "task": task}))
    for name in files:
        (run / "submission" / name).write_text(f"index\tprediction\n0\t{task}-{lr}-{seed}\n")
    return run


def test_table_picks_the_rate_by_dev_mean_over_seeds(tmp_path):
    sweep = tmp_path / "glue"
    # sst2: 1e-4 has the best single seed, 3e-4 the best mean: 3e-4 is chosen
    for lr, scores in (("1e-4", (0.90, 0.70)), ("3e-4", (0.84, 0.82))):
        for seed, acc in zip((1, 2), scores):
            write_run(sweep, "sst2", lr, seed, {"dev": {"accuracy": acc}}, TEST_SPLITS["sst2"])
    # mnli: two dev splits, the task score averages them; MRPC two metrics
    for seed, (m, mm) in zip((1, 2), ((0.80, 0.78), (0.82, 0.80))):
        write_run(sweep, "mnli", "5e-5", seed, {"dev_matched": {"accuracy": m}, "dev_mismatched": {"accuracy": mm}})
    write_run(sweep, "mrpc", "1e-4", 1, {"dev": {"f1": 0.88, "accuracy": 0.84}})
    (sweep / "sst2" / "lr1e-4" / "unfinished").mkdir()  # ignored: not a seed folder with results
    (sweep / "logs").mkdir()  # ignored: not a task

    runs = find_runs(sweep)
    assert len(runs) == 7
    table = collect(runs)
    sst2 = table["tasks"]["sst2"]
    assert sst2["lr"] == 3e-4 and sst2["seeds"] == [1, 2]
    assert sst2["metrics"]["dev"]["accuracy"]["mean"] == pytest.approx(0.83)
    assert sst2["metrics"]["dev"]["accuracy"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert sst2["chosen_seed"] == 1 and sst2["grid"]["0.0001"]["mean_score"] == pytest.approx(0.80)
    mnli = table["tasks"]["mnli"]
    assert mnli["metrics"]["dev_matched"]["accuracy"]["mean"] == pytest.approx(0.81)
    assert mnli["metrics"]["dev_mismatched"]["accuracy"]["mean"] == pytest.approx(0.79)
    assert mnli["score"]["mean"] == pytest.approx(0.80)
    assert table["tasks"]["mrpc"]["score"]["mean"] == pytest.approx(0.86)
    assert table["average"] == pytest.approx((0.83 + 0.80 + 0.86) / 3)
    assert list(table["tasks"]) == ["sst2", "mrpc", "mnli"]  # the paper's order

    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "collect.py"), str(sweep), "--out",
                           str(tmp_path / "table"), "--zip", str(tmp_path / "glue.zip")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not writing a leaderboard zip: missing CoLA.tsv, MRPC.tsv, STS-B.tsv" in proc.stderr
    assert "AX.tsv" in proc.stderr and not (tmp_path / "glue.zip").exists()
    text = (tmp_path / "table" / "glue_table.md").read_text()  # the table is written even so
    assert "MNLI-m (accuracy) | MNLI-mm (accuracy)" in text and "83.0+-1.4" in text
    assert json.loads((tmp_path / "table" / "glue_table.json").read_text())["tasks"]["sst2"]["lr"] == 3e-4


def test_zip_holds_every_leaderboard_file_from_the_chosen_runs(tmp_path):
    sweep = tmp_path / "glue"
    for task, files in TEST_SPLITS.items():
        dev = ({"dev_matched": {"accuracy": 0.8}, "dev_mismatched": {"accuracy": 0.8}} if task == "mnli" else
               {"dev": {m: 0.5 for m in {"cola": ["matthews_correlation"], "mrpc": ["f1", "accuracy"],
                                          "qqp": ["f1", "accuracy"], "stsb": ["pearson", "spearmanr"]}.get(
                   task, ["accuracy"])}})
        write_run(sweep, task, "1e-4", 1, dev, files)
        worse = json.loads(json.dumps(dev))
        for split in worse.values():
            for m in split:
                split[m] -= 0.1
        write_run(sweep, task, "1e-4", 2, worse, files)  # seed 2 is worse: seed 1's files go in
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "collect.py"), str(sweep), "--zip",
                           str(tmp_path / "glue.zip")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp_path / "glue.zip") as z:
        assert sorted(z.namelist()) == sorted(LEADERBOARD_FILES)
        assert z.read("AX.tsv").decode().endswith("mnli-1e-4-1\n")
        assert z.read("SST-2.tsv").decode().endswith("sst2-1e-4-1\n")
    assert (sweep / "glue_table.md").is_file()


def test_bad_sweep_folders(tmp_path):
    cmd = [sys.executable, str(REPO / "finetune" / "collect.py")]
    proc = subprocess.run(cmd + [str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "sweep folder not found" in proc.stderr
    proc = subprocess.run(cmd + [str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no finished run" in proc.stderr
