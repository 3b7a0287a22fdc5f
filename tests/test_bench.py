"""Smoke tests of the benchmarks (bench/*.py --quick): each runs, writes its JSON, and the figures are sane.

The scripts run in this process through their ``main`` (one import of torch/transformers for
all); memory.py additionally starts one two-rank run through the real deepspeed launcher.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import bank_scoring, corpus_throughput, inference_speed, memory, perturb_strength, prediction_spread, \
    step_efficiency
from tests.helpers import offline_teacher_dir, timeout

MACHINE_KEYS = {"cpu_model", "cpu_cores", "torch", "deepspeed", "loadavg_start", "loadavg_end", "command"}


def run_quick(module, name, tmp_path, capsys, extra=()):
    assert module.main(["--quick", "--json", "--out_dir", str(tmp_path), *extra]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, "--json prints exactly one line on stdout"
    data = json.loads(lines[0])
    assert data == json.loads((tmp_path / f"{name}.json").read_text())
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["quick"] is True
    return data


@timeout(300)
def test_inference_speed_reports_every_setting_and_runtime(tmp_path, capsys):
    """The benchmark's figures are complete and consistent. Timed speedups are the benchmark's
    to report (BENCHMARKS.md section 1), not this test's to assert: on shared cores a timed
    ratio moves with whatever else runs."""
    pytest.importorskip("onnxruntime")
    data = run_quick(inference_speed, "inference_speed", tmp_path, capsys, ["--no_bf16"])
    assert len(data["settings"]) == 3
    for row in data["settings"]:
        for key in ("teacher_ms", "student_ms", "speedup", "flop_ratio", "param_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, key
        for runtime in ("onnx_fp32", "onnx_int8"):  # the exported models, timed like the PyTorch ones
            assert math.isfinite(row[runtime]["speedup"]) and row[runtime]["speedup"] > 0, runtime
        ratio = row["int8_student_over_pytorch_student"]
        assert math.isfinite(ratio) and ratio > 0
        assert row["speedup"] == pytest.approx(row["teacher_ms"] / row["student_ms"])
        assert 15 < row["flop_ratio"] < 25  # ~17.9 at seq 128; the attention term shifts it a little
        assert 7 < row["param_ratio"] < 8  # the paper's 7.5x smaller
    assert set(data["onnx_goals"]) == {row["setting"] for row in data["settings"]}
    assert (tmp_path / "inference_speed.png").stat().st_size > 0


@timeout(120)
def test_step_efficiency_parts_and_ratio(tmp_path, capsys):
    data = run_quick(step_efficiency, "step_efficiency", tmp_path, capsys)
    assert data["reference_ms"] == pytest.approx(sum(v for k, v in data["reference_parts_ms"].items()
                                                     if k != "optimizer"), rel=0.5)
    for name, variant in data["variants"].items():
        assert variant["ratio_of_medians"] == pytest.approx(variant["whole_step_ms"] / data["reference_ms"])
        assert variant["ratio"] == pytest.approx(variant["ratio_per_step"][0])  # one timed step
        phases = variant["phases_ms"]
        for key in ("teacher_forward", "student_forward_clean", "perturbation_grad", "student_forward_perturbed",
                    "losses_clean", "backward", "optimizer"):
            assert phases[key] > 0, (name, key)
    assert data["variants"]["bank_negatives"]["phases_ms"]["bank_scoring"] > 0
    assert data["variants"]["bank_negatives"]["phases_ms"]["bank_enqueue"] > 0
    assert "bank_scoring" not in data["variants"]["batch_negatives"]["phases_ms"]
    assert [(v["negatives"], v["perturb_mode"]) for v in data["variants"].values()] == [
        ("batch", "add"), ("batch", "replace"), ("bank", "replace")]  # the task stage's default first


@timeout(90)
def test_corpus_throughput_counts_tokens(tmp_path, capsys):
    data = run_quick(corpus_throughput, "corpus_throughput", tmp_path, capsys)
    runs = data["runs"]
    for key in ("bare_1w", "bare_2w", "pipeline_1w", "pipeline_2w"):
        assert runs[key]["tokens"] > 10_000 and runs[key]["tokens_per_s"] > 0
    assert runs["bare_1w"]["tokens"] == runs["bare_2w"]["tokens"]  # same text, however split
    assert runs["pipeline_1w"]["tokens"] == runs["pipeline_2w"]["tokens"]  # shards do not depend on workers
    assert data["pipeline_over_bare_1w"] == pytest.approx(
        runs["pipeline_1w"]["tokens_per_s"] / runs["bare_1w"]["tokens_per_s"])


@timeout(150)
def test_memory_bank_halves_and_two_rank_run(tmp_path, capsys):
    data = run_quick(memory, "memory", tmp_path, capsys)
    banks = {row["world_size"]: row for row in data["bank"]["per_world"]}
    assert banks[2]["vector_bytes_per_rank"] * 2 == banks[1]["vector_bytes_per_rank"]
    assert all(row["exactly_one_over_world"] for row in banks.values())
    stage = data["two_rank_run"]["stages"][0]
    assert [r["rank"] for r in stage["ranks"]] == [0, 1]
    for r in stage["ranks"]:
        assert r["rss_peak_mib"] > r["rss_before_model_mib"] > 0
    check = data["model"]["checks_two_rank"][0]
    assert check["bank_measured_over_model"] == pytest.approx(1.0, rel=0.01)
    assert check["zero_measured_over_model"] == pytest.approx(1.0, rel=0.01)
    # bytes per rank per step keyed by world size (the quick run counts world 2 only), equal to
    # the written model; the code before the grouped bank moved every rank's vectors
    run = data["scaling_run"]["per_world"]["2"]
    assert data["bank_bytes_per_rank_step"]["2"] == run["model"]["bank"]
    assert data["batch_negatives_bytes_per_rank_step"]["2"] == run["model"]["batch_negatives"]
    assert abs(data["zero_bytes_per_rank_step"]["2"] - run["model"]["zero"]) <= 32  # a few scalars
    assert data["bank_bytes_per_rank_step_before"]["2"] > 4 * data["bank_bytes_per_rank_step"]["2"]
    scaling = {row["world_size"]: row for row in data["model"]["scaling"]}
    # the bank's vectors move B_local x L x F per rank at any world size; only the ids grow with it
    after = {world: row["bank_payload_bytes"] for world, row in scaling.items()}
    assert after[8] < after[512] < 1.01 * after[8]
    assert scaling[16]["bank_payload_bytes_before"] == pytest.approx(2 * scaling[8]["bank_payload_bytes_before"],
                                                                     rel=0.01)


def test_fast_path_matches_plain_transformers_in_input_order(tmp_path):
    """lrcbert.inference (SDPA, length buckets, no mask when unpadded) gives the logits plain
    transformers gives, row for row, for single sentences and pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from lrcbert.inference import length_buckets, load_classifier_for_inference, predict_logits
    from tests.helpers import offline_teacher_dir

    tok = AutoTokenizer.from_pretrained(offline_teacher_dir())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    a = ["a short one", "a much longer sentence with quite a few more words in it than the others", "mid size text here",
         "x", "another sentence of some length", "the same length!", "the same length?"]
    b = ["pair " * i for i in range(1, len(a) + 1)]
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fast = load_classifier_for_inference(str(tmp_path))
    for text_b in (None, b):
        enc = tok(a, text_b, truncation=True, max_length=16, padding=True, return_tensors="pt")
        with torch.no_grad():
            want = plain(**enc).logits
        got = predict_logits(fast, tok, a, text_b, max_seq_length=16, batch_size=3)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert sorted(i for batch in length_buckets([3, 1, 2, 3, 5], 2) for i in batch) == [0, 1, 2, 3, 4]
    assert length_buckets([3, 1, 2, 3, 5], 2) == [[4, 0], [3, 2], [1]]


@timeout(120)
def test_bank_scoring_times_a_draw_its_two_passes_and_fresh_draws(tmp_path, capsys):
    data = run_quick(bank_scoring, "bank_scoring", tmp_path, capsys)
    assert data["draw_ms"] > 0 and data["clean_pass_ms"] > 0 and data["perturbed_pass_ms"] > 0
    assert data["two_fresh_draws_ms"] > 0
    assert all(len(times) == data["repeats"] == 2 for times in data["per_repeat_ms"].values())


@timeout(120)
def test_perturb_strength_grows_with_the_radius(tmp_path, capsys):
    # the offline encoder with a fresh head stands in for a fine-tuned teacher: the figures are
    # a smoke test, their meaning needs a real one (BENCHMARKS.md)
    data = run_quick(perturb_strength, "perturb_strength", tmp_path, capsys, ["--teacher", offline_teacher_dir()])
    rises = [data["mean"][f"rise_rel_{e:g}"] for e in perturb_strength.RELATIVE]
    assert data["mean"]["dropout_noise"] > 0 and rises[-1] > rises[0]


@timeout(120)
def test_prediction_spread_reports_each_model_against_the_labels(tmp_path, capsys):
    # a tiny regression model whose bias sits at 2.5 and whose weights are zero predicts a
    # constant: spread 0 (its Pearson is undefined: NaN), the labels' own spread positive
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch = pytest.importorskip("torch")
    tok = AutoTokenizer.from_pretrained(offline_teacher_dir())
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(2.5)
    model.save_pretrained(tmp_path / "constant")
    tok.save_pretrained(tmp_path / "constant")
    data = run_quick(prediction_spread, "prediction_spread", tmp_path, capsys, ["--models", str(tmp_path / "constant")])
    row = data["models"][str(tmp_path / "constant")]
    assert data["dev_examples"] == 16 and data["labels"]["std"] > 0
    assert row["mean"] == pytest.approx(2.5, abs=1e-5) and row["std"] < 1e-5
    with pytest.raises(SystemExit):  # a classification task is refused before any model loads
        prediction_spread.main(["--task", "sst2", "--models", str(tmp_path / "constant"), "--out_dir", str(tmp_path)])


@timeout(180)
def test_a_missing_plot_library_keeps_the_figures(tmp_path):
    """matplotlib is optional: without it the JSON is still written and the run succeeds."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    blocker = tmp_path / "site" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(REPO)]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "inference_speed.py"), "--quick", "--no_bf16",
                           "--no_onnx", "--out_dir", str(out)], capture_output=True, text=True, env=env, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no plot: matplotlib is not installed" in proc.stdout
    assert json.loads((out / "inference_speed.json").read_text())["settings"]
    assert not (out / "inference_speed.png").exists()


def test_teacher_cosine_is_the_mean_cosine_of_different_sentences(tmp_path, capsys):
    """bench/teacher_cosine.py: each mapped layer's mean pairwise cosine, checked against a plain
    loop over pairs of sentences (their masked token matrices, compared whole or averaged)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from bench import teacher_cosine
    from lrcbert.data import glue
    from tests.helpers import GLUE, make_tiny_encoder

    if not (GLUE / "CoLA").is_dir():
        pytest.skip(f"shared GLUE data not found at {GLUE}")
    teacher = make_tiny_encoder(tmp_path / "enc", layers=6)
    n, _, rows = teacher_cosine.teacher_cosines(teacher, glue.get_task("cola"), str(GLUE / "CoLA"), 6, 32, 4)
    assert n == 6 and [(i, t) for i, t, mode, _ in rows if mode == "mean"] == [(1, 1), (2, 3), (3, 4), (4, 6)]
    ex = glue.read_split("cola", GLUE / "CoLA", "train")
    tok, model = AutoTokenizer.from_pretrained(teacher), AutoModel.from_pretrained(teacher).eval()
    with torch.no_grad():
        states = [model(**tok(text, truncation=True, max_length=32, return_tensors="pt"),
                        output_hidden_states=True).hidden_states for text in ex.text_a[:6]]
    for i, t, mode, c in rows:
        vecs = [s[t][0].flatten() if mode == "flatten" else s[t][0].mean(0) for s in states]
        if mode == "flatten":  # unpadded matrices of different lengths: pad with zeros as the script does
            vecs = [torch.nn.functional.pad(v, (0, 32 * s[t].shape[-1] - v.numel())) for v, s in zip(vecs, states)]
        pairs = [torch.nn.functional.cosine_similarity(vecs[a], vecs[b], dim=0).item()
                 for a in range(6) for b in range(6) if a != b]
        assert c == pytest.approx(sum(pairs) / len(pairs), abs=1e-4), (i, t, mode)
    assert teacher_cosine.main(["--task", "cola", "--data_dir", str(GLUE / "CoLA"), "--teacher", teacher,
                                "--examples", "6", "--max_seq_length", "32"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + 8 and all(1.0 <= float(r.split("|")[5]) <= 2.0 for r in table[1:])
