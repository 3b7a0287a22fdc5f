"""bench/reproduce.py in its CI setting: the quality table is produced end to end and cannot rot."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, make_tiny_encoder, run_group
from bench.reproduce import (ROWS, chance_level, check_teacher, same_as_lrc_bert, command_flags, curve_files, paired_test, reconcile_table,
                             row_command, rows_of_task, run_once, summarize_row, write_outputs)
from bench.reproduce import parse_args as parse_reproduce_args


def quick_table(tmp_path, rows):
    pytest.importorskip("textbrewer")
    encoder = make_tiny_encoder(tmp_path / "encoder", layers=2)
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--quick", "--tasks", "sst2", "--teacher", encoder,
           "--out", str(out), "--rows", ",".join(rows)]
    proc = run_group(cmd, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    state = json.loads((out / "results.json").read_text())
    sst2 = state["tasks"]["sst2"]
    assert sst2["metric"] == "accuracy" and 0.4 < sst2["chance"] < 0.6
    assert list(sst2["runs"]) == [n for n in ROWS if n in rows]
    for name, summary in sst2["summary"].items():
        assert summary["lr"] == 1e-3 and summary["n"] == 1 and 0.0 <= summary["mean"] <= 1.0
        run = json.loads((out / "sst2" / name / "lr0.001" / "seed1" / "eval_results.json").read_text())
        assert run["steps"] == (20 if name == "teacher" else 8)
        assert run["stage"] == {"teacher": "teacher", "textbrewer": "textbrewer"}.get(name, "distill")
    table = (out / "table.md").read_text()
    assert all(ROWS[name].description in table for name in rows)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(state["curves"]) == {n for n in rows if ROWS[n].curve}
    assert all(len(points) >= 2 for points in state["curves"].values())  # evals at step 4 and the end
    # the rows really differ: each run's args.json records its flags
    args_of = {n: json.loads((out / "sst2" / n / "lr0.001" / "seed1" / "args.json").read_text()) for n in rows}
    general = state["general_student"]
    assert args_of["lrc_bert"]["student"] == general and args_of["lrc_bert1"]["student"] is None
    assert args_of["textbrewer"]["student"] == general
    setting = json.loads((out / "general" / "general_setting.json").read_text())
    assert setting["student_fingerprint"] == state["fingerprints"]["general_student"]  # the student the runs used

    # a second call reuses every finished run and rewrites the same table
    again = run_group(cmd, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("reusing") == len(rows)
    assert json.loads((out / "results.json").read_text())["tasks"]["sst2"]["summary"] == sst2["summary"]

    # a fresh checkout: results.json is committed, the run folders are not. The recorded runs
    # count without a folder; the teacher, which the students need, is rebuilt only when a
    # student has to run, and must come back as the same model
    for folder in (out / "sst2").iterdir():
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    fresh = run_group(cmd, timeout=300)
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-4000:]
    assert fresh.stdout.count("recorded in results.json") == len(rows) and "done in" not in fresh.stdout
    assert not (out / "sst2").exists() or not any((out / "sst2").iterdir())  # nothing ran
    state = json.loads((out / "results.json").read_text())
    assert state["tasks"]["sst2"]["summary"] == sst2["summary"] and set(state["curves"]) == {n for n in rows if ROWS[n].curve}
    del state["tasks"]["sst2"]["runs"]["lrc_bert1"]["0.001"]["1"]  # one student must run again: from the rebuilt teacher
    (out / "results.json").write_text(json.dumps(state))
    one = run_group(cmd[:-1] + ["lrc_bert1"], timeout=600)
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    assert one.stdout.count("done in") == 2 and (out / "sst2" / "lrc_bert1" / "lr0.001" / "seed1").exists()
    rebuilt = json.loads((out / "results.json").read_text())
    assert rebuilt["fingerprints"]["sst2/teacher/lr0.001/seed1"] == state["fingerprints"]["sst2/teacher/lr0.001/seed1"]
    assert rebuilt["tasks"]["sst2"]["runs"]["teacher"] == sst2["runs"]["teacher"]

    # another general student than the one the runs came from is refused before anything runs
    rebuilt["fingerprints"]["general_student"] = "0" * 16
    (out / "results.json").write_text(json.dumps(rebuilt))
    other = run_group(cmd, timeout=120)
    assert other.returncode == 2 and "is not the general student" in other.stderr
    assert json.loads((out / "results.json").read_text()) == rebuilt
    taken = run_group(cmd + ["--rebuilt_general_student"], timeout=300)  # the same setting rebuilt elsewhere
    assert taken.returncode == 0, (taken.stdout + taken.stderr)[-4000:]
    noted = json.loads((out / "results.json").read_text())
    assert noted["rebuilt"][-1]["recorded_fingerprint"] == "0" * 16
    assert noted["fingerprints"]["general_student"] == state["fingerprints"]["general_student"]
    return args_of


def test_quick_quality_table(tmp_path):
    """The CI setting: the three runners (teacher, our recipe, TextBrewer), both student inits."""
    quick_table(tmp_path, ["teacher", "lrc_bert", "lrc_bert1", "textbrewer"])


@pytest.mark.slow
def test_quick_quality_table_every_row(tmp_path):
    args_of = quick_table(tmp_path, [r for r in ROWS if r != "perturb_on"])  # on SST-2 it is LRC-BERT: not run
    assert args_of["mse"]["intermediate"] == "mse" and args_of["no_cos_nce"]["intermediate"] == "none"
    assert args_of["no_perturb"]["perturb"] is False and args_of["lrc_bert"]["perturb"] is True
    assert args_of["perturb_replace"]["perturb_mode"] == "replace" and args_of["lrc_bert"]["perturb_mode"] == "add"
    assert args_of["perturb_small"]["epsilon"] == 0.003 and args_of["perturb_small"]["perturb_mode"] == "replace"
    assert args_of["two_stage"]["stage1_fraction"] == 0.8 and args_of["lrc_bert"]["stage1_fraction"] == 0
    assert args_of["mean_pooling"]["pooling"] == "mean" and args_of["lrc_bert"]["pooling"] == "flatten"
    assert args_of["pred_ramp"]["prediction_ramp"] == 0.25 and args_of["lrc_bert"]["prediction_ramp"] == 0
    assert args_of["centered"]["cos_nce_form"] == "centered" and args_of["lrc_bert"]["cos_nce_form"] == "paper"
    assert args_of["plain_ft"]["stage2_weights"] == "0:0:1"


def test_every_row_command_parses_and_differs_only_by_its_flags(tmp_path):
    """Each row's command line, built as the table would run it, is accepted by its script's
    own flag parser and carries the row's settings (no run started)."""
    from bench.textbrewer_baseline import BaselineArgs
    from finetune.glue import GlueArgs
    from lrcbert.config import parse_args

    args = bench_reproduce_args(tmp_path)
    seen = {}
    for name, row in ROWS.items():
        cmd = row_command(args, "sst2", tmp_path, name, 3e-4, 2, tmp_path / name, str(tmp_path / "teacher"))
        script = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
        parsed = parse_args(BaselineArgs if row.runner == "textbrewer" else GlueArgs, cmd[script + 1:])
        assert parsed.learning_rate == 3e-4 and parsed.seed == 2 and parsed.task == "sst2", name
        assert parsed.student == (args.general_student if row.init == "general" else None), name
        seen[name] = parsed
    assert seen["teacher"].stage == "teacher" and seen["lrc_bert"].stage == "distill"
    defaults = GlueArgs(task="sst2", teacher="t", output_dir="o")
    lrc = seen["lrc_bert"]
    for field in ("intermediate", "perturb", "stage1_fraction", "stage2_weights", "epsilon", "perturb_mode"):
        assert getattr(lrc, field) == getattr(defaults, field), f"LRC-BERT runs the defaults ({field})"
    assert seen["lrc_bert1"].intermediate == "cos_nce" and seen["lrc_bert1"].stage1_fraction == lrc.stage1_fraction
    assert seen["mse"].intermediate == "mse" and seen["no_cos_nce"].intermediate == "none"
    assert seen["no_perturb"].perturb is False and lrc.perturb is True
    assert seen["perturb_replace"].perturb_mode == "replace" and lrc.perturb_mode == "add"
    assert seen["perturb_small"].epsilon == 0.003 and seen["perturb_small"].perturb_mode == "replace"
    assert lrc.epsilon == 0.01
    assert seen["two_stage"].stage1_fraction == 0.8 and lrc.stage1_fraction == 0
    assert seen["mean_pooling"].pooling == "mean" and lrc.pooling == "flatten"
    assert seen["pred_ramp"].prediction_ramp == 0.25 and seen["lrc_bert1_ramp"].prediction_ramp == 0.25
    assert lrc.prediction_ramp == 0 and seen["lrc_bert1_ramp"].student is None
    assert seen["centered"].cos_nce_form == "centered" and lrc.cos_nce_form == "paper"
    assert seen["lrc_bert1_centered"].cos_nce_form == "centered" and seen["lrc_bert1_centered"].student is None
    for plain in ("plain_ft", "plain_ft_general"):
        assert seen[plain].stage2_weights == "0:0:1" and not seen[plain].perturb and seen[plain].intermediate == "none"


def test_curves_are_recorded_on_the_curve_tasks_only(tmp_path):
    args = bench_reproduce_args(tmp_path)
    assert args.curve_tasks == ["sst2"]

    def evaluates_by_step(task, name):
        return "--eval_steps" in row_command(args, task, tmp_path, name, 3e-4, 1, tmp_path / name, "t")

    assert evaluates_by_step("sst2", "lrc_bert") and evaluates_by_step("sst2", "textbrewer")
    assert not evaluates_by_step("stsb", "lrc_bert") and not evaluates_by_step("sst2", "no_perturb")
    args.curve_tasks = ["sst2", "stsb"]
    assert evaluates_by_step("stsb", "lrc_bert") and evaluates_by_step("stsb", "plain_ft_general")
    assert curve_files("sst2") == ("curves.png", "curves") and curve_files("stsb") == ("curves_stsb.png", "curves_stsb")


def bench_reproduce_args(tmp_path):
    """The table's arguments; the model folders only need to exist (nothing is loaded)."""
    for name in ("encoder", "general"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    return parse_reproduce_args(["--quick", "--teacher", str(tmp_path / "encoder"), "--general_student",
                                 str(tmp_path / "general"), "--out", str(tmp_path / "r"), "--tasks", "sst2"])


def test_summary_arithmetic():
    runs = {"0.0001": {"1": 0.80, "2": 0.70, "3": 0.74}, "0.0003": {"1": 0.5}}
    row = summarize_row(runs, 1e-4, teacher=0.9, chance=0.5)
    assert row["scores"] == {2: 0.70, 3: 0.74} and row["n"] == 2 and not row["selection_only"]
    assert abs(row["mean"] - 0.72) < 1e-12 and abs(row["retention_above_chance"] - 0.22 / 0.4) < 1e-12
    assert abs(row["pct_of_teacher"] - 80.0) < 1e-9 and not row["did_not_learn"]
    flat = summarize_row({"0.0003": {"1": 0.51}}, 3e-4, teacher=0.9, chance=0.5)
    assert flat["selection_only"] and flat["did_not_learn"]
    test = paired_test({2: 0.70, 3: 0.74, 4: 0.72}, {2: 0.72, 3: 0.75, 4: 0.75})
    assert test["seeds"] == [2, 3, 4] and abs(test["mean_diff"] - 0.02) < 1e-12 and 0.0 < test["p"] < 0.2
    assert paired_test({2: 0.7}, {2: 0.8}) is None


def test_chance_is_the_majority_class_share_of_dev():
    from lrcbert.data.glue import get_task

    sst2 = REPO.parent / "shared" / "data" / "GLUE" / "SST-2"
    assert abs(chance_level(get_task("sst2"), sst2, -1) - 444 / 872) < 1e-12
    assert chance_level(get_task("cola"), REPO.parent / "shared" / "data" / "GLUE" / "CoLA", -1) == 0.0


def test_ablation_rows_run_on_sst2_unless_asked_elsewhere():
    asked = ["teacher", "lrc_bert", "no_cos_nce", "plain_ft", "mse"]
    assert rows_of_task(asked, "sst2", ["sst2"]) == asked
    assert rows_of_task(asked, "stsb", ["sst2"]) == ["teacher", "lrc_bert", "plain_ft"]
    assert rows_of_task(asked, "stsb", ["sst2", "stsb"]) == asked
    assert parse_reproduce_args(["--ablation_tasks", "STS-B,sst2"]).ablation_tasks == ["stsb", "sst2"]


def test_bad_arguments_are_refused_before_any_run(tmp_path):
    base = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--out", str(tmp_path / "r")]
    for extra, needle in [(["--rows", "lrc_bert,nope"], "unknown row"), (["--tasks", "nope"], "unknown GLUE task"),
                          (["--teacher", str(tmp_path / "missing")], "no such model folder"),
                          (["--seeds", "1,2"], "chooses the learning rate"),
                          (["--ablation_tasks", "sst2,nope"], "--ablation_tasks"),
                          (["--curve_tasks", "nope"], "--curve_tasks"),
                          (["--general_student", str(tmp_path)], "no config.json")]:
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ a run counts only as its row runs now


def fake_run(args, task, row, seed, glue_flags, score, folder=None):
    """A finished run as finetune/glue.py leaves it: args.json (the flags the command parses to,
    with ``glue_flags`` on top), eval_results.json and the log beside it."""
    from finetune.glue import GlueArgs
    from lrcbert.config import parse_args

    out = args.out_path / task / (folder or row) / "lr0.0003" / f"seed{seed}"
    cmd = row_command(args, task, args.out_path, row, 3e-4, seed, out, "teacher")
    script = next(i for i, c in enumerate(cmd) if c.endswith(".py"))
    parsed = parse_args(GlueArgs, cmd[script + 1:] + list(glue_flags))
    out.mkdir(parents=True)
    (out / "args.json").write_text(json.dumps(dataclasses.asdict(parsed)))
    (out / "eval_results.json").write_text(json.dumps({"dev": {"accuracy": score}}))
    (out.parent / f"seed{seed}.log").write_text("log\n")
    return out


def test_a_default_change_moves_each_run_to_the_row_it_now_matches(tmp_path):
    """The task stage's perturbation default went from replace to add: the runs made as
    'lrc_bert' (replace) become the perturb_replace row, those of the retired 'perturb_add' row
    become lrc_bert, and an ablation made with replace is set aside with its score; nothing is
    deleted and a run that still matches stays."""
    args = bench_reproduce_args(tmp_path)
    args.out_path = tmp_path / "r"
    replace, add = ("--perturb_mode", "replace"), ("--perturb_mode", "add")
    fake_run(args, "sst2", "lrc_bert", 2, replace, 0.79)
    fake_run(args, "sst2", "lrc_bert", 2, add, 0.80, folder="perturb_add")
    fake_run(args, "sst2", "no_cos_nce", 2, replace, 0.70)
    fake_run(args, "sst2", "no_perturb", 2, (), 0.78)
    fake_run(args, "rte", "lrc_bert", 2, replace, 0.55)
    state = {"tasks": {"sst2": {"metric": "accuracy", "chance": 0.5, "summary": {}, "runs": {
        "lrc_bert": {"0.0003": {"2": 0.79}}, "no_cos_nce": {"0.0003": {"2": 0.70}},
        "no_perturb": {"0.0003": {"2": 0.78}}, "perturb_add": {"0.0003": {"2": 0.80}}}},
        "rte": {"metric": "accuracy", "chance": 0.5, "summary": {}, "runs": {"lrc_bert": {"0.0003": {"2": 0.55}}}}},
        "superseded": {"sst2/older": {"note": "kept as it was"}}}
    reconcile_table(args, state)  # every task of the table, asked for or not

    runs = state["tasks"]["sst2"]["runs"]
    assert runs["lrc_bert"] == {"0.0003": {"2": 0.80}} and runs["perturb_replace"] == {"0.0003": {"2": 0.79}}
    assert runs["no_perturb"] == {"0.0003": {"2": 0.78}} and "no_cos_nce" not in runs and "perturb_add" not in runs
    assert list(runs) == [r for r in ROWS if r in runs]  # the table's row order
    assert state["tasks"]["rte"]["runs"] == {"perturb_replace": {"0.0003": {"2": 0.55}}}  # an emptied row goes
    assert set(state["tasks"]["sst2"]["summary"]) == set(runs)  # summarized again, the new rows included
    table = write_outputs(args, state, "python bench/reproduce.py")
    assert ROWS["perturb_replace"].description in table and "perturb_add" not in table
    root = args.out_path / "sst2"
    assert json.loads((root / "lrc_bert/lr0.0003/seed2/args.json").read_text())["perturb_mode"] == "add"
    assert json.loads((root / "perturb_replace/lr0.0003/seed2/args.json").read_text())["perturb_mode"] == "replace"
    assert (root / "perturb_replace/lr0.0003/seed2.log").exists() and not (root / "perturb_add/lr0.0003/seed2").exists()
    aside = state["superseded"]["sst2/no_cos_nce/lr0.0003/seed2"]
    assert aside["score"] == 0.70 and aside["differs (recorded, now)"] == {"perturb_mode": ["replace", "add"]}
    assert (args.out_path / "superseded/sst2/no_cos_nce/lr0.0003/seed2/eval_results.json").exists()
    assert state["superseded"]["sst2/older"] == {"note": "kept as it was"}
    assert not list(args.out_path.rglob("*.reconciling"))

    again = json.loads(json.dumps(state))
    reconcile_table(args, again)  # everything matches now: nothing moves
    assert again["tasks"] == state["tasks"] and again["superseded"] == state["superseded"]


def test_flags_a_run_ignores_do_not_make_it_stale(tmp_path):
    """Evaluation steps, paths, and the perturbation's knobs with --perturb false or the
    distillation flags of teacher fine-tuning never mark a run as made differently."""
    from finetune.glue import GlueArgs, effective_flags

    args = bench_reproduce_args(tmp_path)
    plain = row_command(args, "sst2", tmp_path, "plain_ft", 3e-4, 2, tmp_path / "x", "teacher")
    assert command_flags("glue", plain) == command_flags("glue", plain + ["--perturb_mode", "replace",
                                                                           "--eval_steps", "5", "--epsilon", "0.5"])
    teacher = row_command(args, "sst2", tmp_path, "teacher", 3e-4, 1, tmp_path / "t", None)
    assert command_flags("glue", teacher) == command_flags("glue", teacher + ["--stage1_fraction", "0.8",
                                                                               "--perturb_mode", "replace"])
    lrc = row_command(args, "sst2", tmp_path, "lrc_bert", 3e-4, 2, tmp_path / "x", "teacher")
    assert command_flags("glue", lrc) != command_flags("glue", lrc + ["--perturb_mode", "replace"])
    assert command_flags("glue", lrc) != command_flags("glue", lrc + ["--max_steps", "9"])
    distill = GlueArgs(task="sst2", teacher="t", output_dir="o", intermediate="none", stage1_fraction=0.0)
    assert {"pooling", "num_negatives", "layer_map", "stage1_weights", "output_dir"}.isdisjoint(effective_flags(distill))


def test_a_finished_run_is_reused_only_as_its_row_runs_now(tmp_path):
    args = bench_reproduce_args(tmp_path)
    args.out_path, args.fresh = tmp_path / "r", False
    out = fake_run(args, "sst2", "no_perturb", 2, (), 0.78)
    cmd = row_command(args, "sst2", tmp_path, "no_perturb", 3e-4, 2, out, "teacher")
    readied = []
    results, ran = run_once(args, out, cmd, before_run=lambda: readied.append(1))
    assert results["dev"]["accuracy"] == 0.78 and not ran and not readied  # reused: nothing readied or launched
    stale = fake_run(args, "sst2", "lrc_bert", 2, ("--perturb_mode", "replace"), 0.79)
    with pytest.raises(SystemExit, match="perturb_mode"):
        run_once(args, stale, row_command(args, "sst2", tmp_path, "lrc_bert", 3e-4, 2, stale, "teacher"))
    assert (stale / "eval_results.json").exists()


def test_a_table_refuses_another_budget_before_touching_its_runs(tmp_path):
    out = tmp_path / "r"
    run = out / "sst2" / "lrc_bert" / "lr0.0003" / "seed1"
    run.mkdir(parents=True)
    (run / "eval_results.json").write_text("{}")
    recorded = {"tasks": {}, "settings": {"student_steps": 1200, "teacher_steps": 150, "seeds": [2, 3]}}
    (out / "results.json").write_text(json.dumps(recorded))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--out", str(out), "--tasks", "sst2",
                           "--rows", "plain_ft", "--seeds", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--student_steps 1200" in proc.stderr and "teacher_steps" not in proc.stderr
    assert json.loads((out / "results.json").read_text()) == recorded and (run / "eval_results.json").exists()


def test_runs_known_only_from_results_json_are_reconciled_by_their_record(tmp_path):
    """Without their folders (a fresh checkout) runs are checked against the flags results.json
    recorded for them: a stale one moves to the row it matches or is set aside, in the record alone."""
    from bench.reproduce import recorded_flags

    args = bench_reproduce_args(tmp_path)
    args.out_path = tmp_path / "r"
    made = {"lrc_bert": fake_run(args, "sst2", "lrc_bert", 2, ("--perturb_mode", "replace"), 0.79),
            "no_cos_nce": fake_run(args, "sst2", "no_cos_nce", 2, ("--perturb_mode", "replace"), 0.70),
            "no_perturb": fake_run(args, "sst2", "no_perturb", 2, (), 0.78)}
    state = {"tasks": {"sst2": {"metric": "accuracy", "chance": 0.5, "summary": {}, "runs": {
        "lrc_bert": {"0.0003": {"2": 0.79}}, "no_cos_nce": {"0.0003": {"2": 0.70}},
        "no_perturb": {"0.0003": {"2": 0.78}}, "plain_ft": {"0.0003": {"2": 0.72}}}}},
        "superseded": {"sst2/no_cos_nce/lr0.0003/seed2": {"score": 0.69}}}  # set aside before; no folder either
    state["records"] = {f"sst2/{name}/lr0.0003/seed2": dict(zip(("runner", "flags"), recorded_flags(out)))
                        for name, out in made.items()}
    del state["records"]["sst2/no_perturb/lr0.0003/seed2"]["flags"]["temperature"]  # as if the flag came later
    shutil.rmtree(args.out_path)  # the folders go, results.json stays
    reconcile_table(args, state)

    runs = state["tasks"]["sst2"]["runs"]
    assert runs["perturb_replace"] == {"0.0003": {"2": 0.79}} and "lrc_bert" not in runs
    assert runs["no_perturb"] == {"0.0003": {"2": 0.78}} and "no_cos_nce" not in runs
    assert runs["plain_ft"] == {"0.0003": {"2": 0.72}}  # no folder and no record (older than records): kept
    assert state["superseded"]["sst2/no_cos_nce/lr0.0003/seed2"]["score"] == 0.69  # kept
    assert state["superseded"]["sst2/no_cos_nce/lr0.0003/seed2.2"]["score"] == 0.70
    assert set(state["records"]) == {"sst2/perturb_replace/lr0.0003/seed2", "sst2/no_perturb/lr0.0003/seed2"}
    assert state["records"]["sst2/perturb_replace/lr0.0003/seed2"]["flags"]["perturb_mode"] == "replace"
    assert not any(p.is_file() for p in args.out_path.rglob("*"))

    again = json.loads(json.dumps(state))
    reconcile_table(args, again)  # stable
    assert again["tasks"] == state["tasks"] and again["records"] == state["records"]
    assert again["superseded"] == state["superseded"]


def test_a_rebuilt_teacher_counts_only_as_the_same_model(tmp_path):
    """Another CPU rounds differently: a rebuilt teacher with other bits but the recorded dev
    score (within the tolerance) is kept and noted; one that scores otherwise is moved aside
    and stops the table."""
    from safetensors.torch import save_file

    args = bench_reproduce_args(tmp_path)
    args.out_path = tmp_path / "r"
    out = args.out_path / "sst2" / "teacher" / "lr0.0001" / "seed1"

    def rebuilt(weight, score):
        (out / "model").mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((3,), weight)}, str(out / "model" / "model.safetensors"))
        (out / "eval_results.json").write_text(json.dumps({"dev": {"accuracy": score}}))

    state = {}
    rebuilt(1.0, 0.8268)
    check_teacher(args, state, "sst2", "accuracy", out, None)  # made by this table: its fingerprint is kept
    first = state["fingerprints"]["sst2/teacher/lr0.0001/seed1"]  # one per rate of the teacher's grid
    rebuilt(1.0, 0.5)
    check_teacher(args, state, "sst2", "accuracy", out, 0.8268)  # the same weights: the same teacher
    assert "rebuilt" not in state
    rebuilt(1.0 + 1e-7, 0.8268 + 2e-6)
    check_teacher(args, state, "sst2", "accuracy", out, 0.8268)
    assert state["fingerprints"]["sst2/teacher/lr0.0001/seed1"] != first and state["rebuilt"][0]["recorded_fingerprint"] == first
    assert state["rebuilt"][0]["dev"] == 0.8268 + 2e-6 and "cpu" in state["rebuilt"][0]["machine"]
    rebuilt(2.0, 0.81)
    with pytest.raises(SystemExit, match="rebuilt sst2 teacher differs"):
        check_teacher(args, state, "sst2", "accuracy", out, 0.8268)
    assert not out.exists() and (out.parent / "seed1.rebuilt" / "eval_results.json").exists()
    assert len(state["rebuilt"]) == 1


def test_rows_that_run_lrc_berts_command_on_a_task_are_lrc_bert_there(tmp_path):
    """The perturbation is off by default on STS-B: there no_perturb is LRC-BERT (its runs move
    to the LRC-BERT row and it is not run), the runs made with it on move to perturb_on, and on
    SST-2 it is the other way round."""
    args = bench_reproduce_args(tmp_path)
    args.out_path = tmp_path / "r"
    assert same_as_lrc_bert(args, "stsb", tmp_path, "no_perturb") and not same_as_lrc_bert(args, "sst2", tmp_path,
                                                                                             "no_perturb")
    assert same_as_lrc_bert(args, "sst2", tmp_path, "perturb_on") and not same_as_lrc_bert(args, "stsb", tmp_path,
                                                                                             "perturb_on")
    assert not any(same_as_lrc_bert(args, "stsb", tmp_path, r) for r in ROWS if r not in ("no_perturb",))
    fake_run(args, "stsb", "lrc_bert", 2, ("--perturb", "true"), 0.14)  # made when the default perturbed
    fake_run(args, "stsb", "no_perturb", 2, (), 0.18)
    fake_run(args, "stsb", "perturb_replace", 2, ("--perturb", "true", "--perturb_mode", "replace"), 0.12)
    fake_run(args, "sst2", "no_perturb", 2, (), 0.78)
    state = {"tasks": {task: {"metric": "accuracy", "chance": 0.5, "summary": {}, "runs": runs} for task, runs in {
        "stsb": {"lrc_bert": {"0.0003": {"2": 0.14}}, "no_perturb": {"0.0003": {"2": 0.18}},
                 "perturb_replace": {"0.0003": {"2": 0.12}}},
        "sst2": {"no_perturb": {"0.0003": {"2": 0.78}}}}.items()}}
    png, key = curve_files("stsb")
    state[key] = {"lrc_bert": [[400, 0.14]], "no_perturb": [[400, 0.18]], "perturb_replace": [[400, 0.12]]}
    state["curve_sources"] = {key: {"lrc_bert": "stsb/lrc_bert/lr0.0003/seed2",
                                    "perturb_replace": "stsb/perturb_replace/lr0.0003/seed2"}}
    reconcile_table(args, state)
    assert state[key] == {"perturb_replace": [[400, 0.12]]}  # the curves of the runs that moved are not drawn again
    stsb = state["tasks"]["stsb"]["runs"]
    assert stsb["lrc_bert"] == {"0.0003": {"2": 0.18}} and stsb["perturb_on"] == {"0.0003": {"2": 0.14}}
    assert "no_perturb" not in stsb and stsb["perturb_replace"] == {"0.0003": {"2": 0.12}}
    assert state["tasks"]["sst2"]["runs"] == {"no_perturb": {"0.0003": {"2": 0.78}}}
    root = args.out_path / "stsb"
    assert json.loads((root / "lrc_bert/lr0.0003/seed2/args.json").read_text())["perturb"] is False
    assert json.loads((root / "perturb_on/lr0.0003/seed2/args.json").read_text())["perturb"] is True
    assert "superseded" not in state


def test_a_table_older_than_fingerprints_notes_the_general_student_it_first_records(tmp_path):
    """The general student's fingerprint is first recorded in a table that already holds runs
    from a general student (made before fingerprints were kept, perhaps on another machine):
    results.json says so; a recorded run without its folder is not rerun."""
    from safetensors.torch import save_file

    general = tmp_path / "general"
    general.mkdir()
    (general / "config.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(general / "model.safetensors"))
    out = tmp_path / "r"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"tasks": {"sst2": {
        "metric": "accuracy", "chance": 0.5, "summary": {}, "paired": {},
        "runs": {"teacher": {"0.001": {"1": 0.8}}, "lrc_bert": {"0.001": {"1": 0.75}}}}}}))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "reproduce.py"), "--quick", "--out", str(out),
                           "--tasks", "sst2", "--rows", "teacher", "--teacher", str(general),
                           "--general_student", str(general)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recorded in results.json" in proc.stdout and "done in" not in proc.stdout
    state = json.loads((out / "results.json").read_text())
    fp = state["fingerprints"]["general_student"]
    assert state["rebuilt"] == [{"general_student": str(general), "fingerprint": fp, "recorded_fingerprint": None,
                                 "machine": state["rebuilt"][0]["machine"]}]
    assert state["tasks"]["sst2"]["runs"]["lrc_bert"] == {"0.001": {"1": 0.75}}
