"""bench/textbrewer_baseline.py: TextBrewer's GeneralDistiller driven on slices of real GLUE data,
with tiny random teachers and students (end to end as a subprocess), and its bad-input errors."""

import json
import math
import os

import pytest

pytest.importorskip("textbrewer")

from bench.textbrewer_baseline import intermediate_matches, main  # noqa: E402
from lrcbert.method.layer_map import uniform_layer_map  # noqa: E402
from tests.helpers import (GLUE, PY, REPO, make_tiny_encoder, make_tiny_sst2_teacher, offline_teacher_dir,  # noqa: E402
                           read_scalars, run_group, tail)

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data not found at {GLUE}")

SCRIPT = str(REPO / "bench" / "textbrewer_baseline.py")
TINY_STUDENT = ["--student_layers", "2", "--student_hidden", "32", "--student_intermediate", "64",
                "--student_heads", "4"]


def baseline_args(task, folder, teacher, out, *extra, steps=6):
    return ["--finetuned_teacher", str(teacher), "--task", task, "--data_dir", str(GLUE / folder),
            "--output_dir", str(out), "--max_seq_length", "32", "--max_train_samples", "24",
            "--max_eval_samples", "32", "--max_steps", str(steps), "--train_batch_size", "4",
            "--learning_rate", "1e-3", "--warmup", "0.1", "--seed", "1", *extra]


def run_script(argv, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return run_group([PY, SCRIPT, *argv], timeout, env)


def no_checkpoint_files(out):
    return not [p for p in out.rglob("*.pkl")]


@pytest.fixture(scope="module")
def sst2_teacher_dir(tmp_path_factory):
    """A glue.py --stage teacher output dir: the classifier lives in its model/ folder."""
    root = tmp_path_factory.mktemp("tb_sst2")
    make_tiny_sst2_teacher(root / "teacher" / "model")
    return root / "teacher"


@pytest.fixture(scope="module")
def stsb_teacher(tmp_path_factory):
    """A tiny random 4-layer regression teacher (one output), with the offline teacher's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tb_stsb") / "teacher"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(offline_teacher_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=128, num_labels=1, problem_type="regression")
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_layer_matches_are_tinybert_style():
    matches = intermediate_matches(uniform_layer_map(4, 12), 312, 768)
    assert [(m["layer_S"], m["layer_T"]) for m in matches] == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert all(m["feature"] == "hidden" and m["loss"] == "hidden_mse" and m["weight"] == 1
               and m["proj"] == ["linear", 312, 768] for m in matches)


def test_sst2_end_to_end(sst2_teacher_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_script(baseline_args("sst2", "SST-2", sst2_teacher_dir, out, *TINY_STUDENT, "--eval_steps", "3"))
    assert proc.returncode == 0, tail(proc)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["task"] == "sst2" and results["stage"] == "textbrewer" and results["steps"] == 6
    accuracy = results["dev"]["accuracy"]
    assert math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0
    assert set(results["teacher"]["dev"]) == {"accuracy"}
    # the student: the fresh --student_* shape with SST-2's head, and its tokenizer
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (2, 32)
    assert cfg["id2label"] == {"0": "negative", "1": "positive"}
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "args.json").read_text())["max_steps"] == 6
    # the curve: every --eval_steps and the end, whose point is the final result
    curve = json.loads((out / "curve.json").read_text())
    assert [p["step"] for p in curve] == [3, 6] and curve[-1]["accuracy"] == accuracy
    # TextBrewer's own scalars (under OUT/textbrewer): one per step, every loss term, and it learned
    scalars = read_scalars(out / "textbrewer" / "tensorboard")
    total = [v for _, v in scalars["scalar/total_loss"]]
    assert len(total) == 6 and all(math.isfinite(v) for v in total)
    assert total[-1] < total[0], total
    for tag in ("unweighted_kd_loss", "unweighted_hard_label_loss", "unweighted_hidden_hidden_mse_0_0",
                "unweighted_hidden_hidden_mse_1_1", "unweighted_hidden_hidden_mse_2_2"):
        assert f"scalar/{tag}" in scalars, sorted(scalars)
    assert no_checkpoint_files(out)


def test_stsb_regression_with_given_student(stsb_teacher, tmp_path):
    student = make_tiny_encoder(tmp_path / "general_student", layers=2, hidden=32)
    out = tmp_path / "out"
    proc = run_script(baseline_args("stsb", "STS-B", stsb_teacher, out, "--student", student, steps=4))
    assert proc.returncode == 0, tail(proc)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["stage"] == "textbrewer" and results["steps"] == 4
    assert set(results["dev"]) == {"pearson", "spearmanr"}
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in results["dev"].values())
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
    scalars = read_scalars(out / "textbrewer" / "tensorboard")
    # teacher 4 layers, student 2: embeddings 0 -> 0, 1 -> 2, 2 -> 4; the soft loss is TextBrewer's MSE
    for tag in ("unweighted_kd_loss", "unweighted_hard_label_loss", "unweighted_hidden_hidden_mse_0_0",
                "unweighted_hidden_hidden_mse_1_2", "unweighted_hidden_hidden_mse_2_4"):
        assert len(scalars[f"scalar/{tag}"]) == 4
    assert not (out / "curve.json").exists() and no_checkpoint_files(out)


@pytest.mark.parametrize("case", ["missing_teacher", "unknown_task", "missing_data_dir", "zero_steps"])
def test_bad_input_one_line_exit_2(case, sst2_teacher_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = baseline_args("sst2", "SST-2", sst2_teacher_dir, out, *TINY_STUDENT)
    if case == "missing_teacher":
        argv[argv.index("--finetuned_teacher") + 1] = str(tmp_path / "nope")
    elif case == "unknown_task":
        argv[argv.index("--task") + 1] = "sst3"
    elif case == "missing_data_dir":
        argv[argv.index("--data_dir") + 1] = str(tmp_path / "no_glue")
    else:
        argv[argv.index("--max_steps") + 1] = "0"
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()  # nothing written before the checks pass


def test_bad_input_as_a_subprocess(tmp_path):
    out = tmp_path / "out"
    proc = run_script(baseline_args("sst2", "SST-2", tmp_path / "missing", out, *TINY_STUDENT), timeout=60)
    assert proc.returncode == 2, tail(proc)
    assert proc.stderr.strip().splitlines() == [f"error: --finetuned_teacher directory not found: {tmp_path / 'missing'}"]
    assert not out.exists()
