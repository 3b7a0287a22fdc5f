"""bench/reproduce.py in its CI setting: the ablation table is produced end to end and cannot rot."""

import json
import subprocess
import sys

from tests.helpers import REPO, make_tiny_encoder, run_group
from bench.reproduce import VARIANTS


def test_quick_ablation_table(tmp_path):
    encoder = make_tiny_encoder(tmp_path / "encoder", layers=2)
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--quick", "--teacher", encoder, "--out", str(out)]
    proc = run_group(cmd, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    summary = json.loads((out / "reproduce.json").read_text())
    assert summary["metric"] == "accuracy" and 0.0 < summary["teacher"] <= 1.0
    assert [r["variant"] for r in summary["rows"]] == list(VARIANTS)
    for row in summary["rows"]:
        assert len(row["scores"]) == 1 and 0.0 <= row["mean"] <= 1.0
        assert abs(row["retained_pct"] - 100 * row["mean"] / summary["teacher"]) < 1e-9
        run = json.loads((out / row["variant"] / "seed1" / "eval_results.json").read_text())
        assert run["stage"] == "distill" and run["steps"] == 8
    table = (out / "table.md").read_text()
    assert all(desc in table for desc, _ in VARIANTS.values())
    assert (out / "reproduce.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the flags really differ per variant: each run's args.json records its ablation
    args_of = {v: json.loads((out / v / "seed1" / "args.json").read_text()) for v in VARIANTS}
    assert args_of["mse"]["intermediate"] == "mse" and args_of["no_intermediate"]["intermediate"] == "none"
    assert args_of["no_perturb"]["perturb"] is False and args_of["full"]["perturb"] is True
    assert args_of["no_two_stage"]["stage1_fraction"] == 0 and args_of["full"]["stage1_fraction"] > 0

    # a second call reuses every finished run and rewrites the same table
    again = run_group(cmd, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("reusing") == 1 + len(VARIANTS)
    assert json.loads((out / "reproduce.json").read_text())["rows"] == summary["rows"]


def test_bad_arguments_are_refused_before_any_run(tmp_path):
    base = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--out", str(tmp_path / "r")]
    for extra, needle in [(["--variants", "full,nope"], "unknown variant"), (["--task", "nope"], "unknown GLUE task"),
                          (["--teacher", str(tmp_path / "missing")], "no such model folder")]:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()
