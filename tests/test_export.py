"""lrcbert-export and score.py --runtime onnx: real ONNX files run by ONNX Runtime.

A tiny random classifier for the command end to end (export, int8, parity, scoring), and the
offline MiniLM encoder with a fresh 2-label head for the graph's numerics at real size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, SHARED_DATA, make_tiny_sst2_teacher, offline_teacher_dir

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
SST2 = SHARED_DATA / "GLUE" / "SST-2"


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "finetune" / "export.py"), *args], capture_output=True,
                          text=True, timeout=600)


def score(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "finetune" / "score.py"), *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tiny_classifier_export_int8_parity_and_scoring(tmp_path):
    model = make_tiny_sst2_teacher(tmp_path / "model")
    out = tmp_path / "onnx"
    proc = export(str(model), "--int8", "--output_dir", str(out), "--task", "sst2", "--data_dir", str(SST2),
                  "--max_eval_samples", "200", "--max_seq_length", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.onnx", "model.int8.onnx", "parity.json", "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["examples"] == 200
    assert report["fp32"]["agreement"] == 1.0 and report["fp32"]["max_abs_logit_diff"] < 1e-4
    assert report["int8"]["agreement"] >= 0.95
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size

    # score.py: the ONNX runtime gives what parity.json recorded; PyTorch gives the reference
    flags = ["--task", "sst2", "--data_dir", str(SST2), "--max_eval_samples", "200", "--max_seq_length", "64"]
    assert score("--runtime", "onnx", "--model", str(out), *flags)["dev"] == report["fp32"]["metrics"]
    assert score("--runtime", "onnx", "--model", str(out), "--onnx_file", "model.int8.onnx",
                 *flags)["dev"] == report["int8"]["metrics"]
    assert score("--model", str(model), *flags)["dev"] == report["pytorch"]["metrics"]


def test_pretrained_encoder_export_parity_scoring_and_padded_batches(tmp_path):
    """The real MiniLM encoder through lrcbert-export and score.py, and its graph: dynamic batch
    and sequence axes, padding masked like PyTorch."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lrcbert.export import OnnxClassifier

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(offline_teacher_dir(), num_labels=2).eval()
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(offline_teacher_dir()).save_pretrained(tmp_path / "model")
    # the command end to end at real size: export, int8, parity on SST-2 dev, then score.py on
    # the ONNX files. The head is random (near-ties flip under int8 noise), so the int8 limit is
    # loosened here; a fine-tuned student's figures are in BENCHMARKS.md section 5.
    out = tmp_path / "onnx"
    flags = ["--task", "sst2", "--data_dir", str(SST2), "--max_eval_samples", "120", "--max_seq_length", "64"]
    proc = export(str(tmp_path / "model"), "--int8", "--output_dir", str(out), *flags, "--int8_min_agreement", "0.8",
                  "--int8_max_metric_drop", "0.1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["fp32"]["agreement"] == 1.0, report
    assert score("--runtime", "onnx", "--model", str(out), *flags)["dev"] == report["fp32"]["metrics"]
    assert score("--runtime", "onnx", "--model", str(out), "--onnx_file", "model.int8.onnx",
                 *flags)["dev"] == report["int8"]["metrics"]
    session = OnnxClassifier(str(out / "model.onnx"))
    for batch, seq in ((1, 5), (3, 40), (7, 128)):
        ids = torch.randint(1000, 29000, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0  # one padded row in every batch
        types = torch.zeros_like(ids)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()
        got = session.logits({"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                              "token_type_ids": types.numpy()})
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)


def test_parity_limits_and_bad_input(tmp_path):
    model = make_tiny_sst2_teacher(tmp_path / "model")
    # an impossible limit: the files are written, parity.json says why, exit status 4
    proc = export(str(model), "--int8", "--output_dir", str(tmp_path / "onnx"), "--task", "sst2", "--data_dir",
                  str(SST2), "--max_eval_samples", "50", "--int8_min_agreement", "1.01")
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "error: parity check failed" in proc.stderr and "int8 agrees with PyTorch" in proc.stderr
    assert json.loads((tmp_path / "onnx" / "parity.json").read_text())["passed"] is False
    proc = export(str(tmp_path / "missing"), "--onnx")
    assert proc.returncode == 2 and "no config.json" in proc.stderr
    proc = export(str(model))
    assert proc.returncode == 2 and "--onnx and/or --int8" in proc.stderr
    assert not os.path.exists(tmp_path / "missing")
