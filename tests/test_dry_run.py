"""--dry_run (both recipes): every check runs, the plan is printed, nothing starts.

The plan's model-state figures are checked against what bench/memory.py measured on a real
two-rank ZeRO run (bench/results/memory.json): the tensors each rank held at each stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, SHARED_DATA, make_tiny_encoder, make_tiny_sst2_teacher, make_wiki_corpus

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")}


def run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *flags], capture_output=True, text=True,
                          env=ENV, timeout=300)


def test_glue_dry_run_plans_for_a_cluster_and_starts_nothing(tmp_path):
    teacher = make_tiny_sst2_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    proc = run("finetune/glue.py", "--dry_run", "--world_size", "64", "--ds_config", "ds_configs/z2.json",
               "--task", "sst2", "--data_dir", str(SHARED_DATA / "GLUE" / "SST-2"), "--teacher", str(teacher),
               "--output_dir", str(out), "--micro_batch_size", "8", "--gradient_accumulation_steps", "2",
               "--max_seq_length", "64", "--num_epochs", "2", "--student_layers", "2", "--student_hidden", "64",
               "--student_intermediate", "128", "--student_heads", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "micro 8 x accumulation 2 x world 64 = 1024 sequences of 64 tokens" in text
    # 67,349 training examples / 1,024 per step = 65 steps per epoch; 2 epochs
    assert "130 optimizer steps; 2.00 epochs of 67,349 training examples (65 steps per epoch)" in text
    assert "dev 872" in text and "ZeRO-2 (configured)" in text
    assert "student layer | teacher layer" in text  # the layer map
    config = json.loads(text[text.index("resolved ds_config:") + len("resolved ds_config:"):])
    assert config["train_batch_size"] == 1024 and config["zero_optimization"]["stage"] == 2
    assert not out.exists()  # nothing written, no process group, no training


def test_pretrain_dry_run_counts_the_bank_per_rank(tmp_path):
    from lrcbert.method.bank import MemoryBank

    encoder = make_tiny_encoder(tmp_path / "teacher", layers=4, hidden=64)
    corpus = make_wiki_corpus(tmp_path, 200, 32, encoder)
    proc = run("pretrain/general_distill.py", "--dry_run", "--world_size", "8", "--teacher", encoder,
               "--corpus", str(corpus), "--output_dir", str(tmp_path / "run"), "--max_seq_length", "32",
               "--micro_batch_size", "4", "--bank_size", "512", "--max_steps", "50", "--student_layers", "2",
               "--student_hidden", "32", "--student_intermediate", "64", "--student_heads", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bank = MemoryBank(2, 512, 32 * 64, rank=0, world_size=8, dtype=__import__("torch").float16, device="meta",
                      groups=32)  # --bank_groups 64 lowered: 512 / 32 = 16 slots per group > K = 15
    assert "--bank_groups 64 lowered to 32" in proc.stdout
    assert f"memory bank: {bank.bytes_per_rank() / 2**20:,.1f} MiB per rank" in proc.stdout
    assert "micro 4 x accumulation 1 x world 8 = 32 sequences" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_world_size_without_dry_run_and_bad_input_are_refused(tmp_path):
    teacher = make_tiny_sst2_teacher(tmp_path / "teacher")
    base = ["--task", "sst2", "--data_dir", str(SHARED_DATA / "GLUE" / "SST-2"), "--teacher", str(teacher),
            "--output_dir", str(tmp_path / "run")]
    proc = run("finetune/glue.py", "--world_size", "4", *base)
    assert proc.returncode == 2 and "--world_size plans a run with --dry_run" in proc.stderr
    proc = run("finetune/glue.py", "--dry_run", "--world_size", "4", "--max_steps", "-5", *base)
    assert proc.returncode == 2 and "--max_steps must be positive" in proc.stderr  # a dry run checks like a run


def test_model_states_match_what_a_real_zero_run_held():
    """The estimate for bench/memory.py's run (default student + projections to 768, fp32, two
    ranks) against the tensors each rank held at ZeRO 0-3: within 25% (they agree exactly)."""
    from transformers import BertConfig

    from lrcbert.models import StudentShape, student_config, with_labels
    from lrcbert.runtime import plan

    measured = json.loads((REPO / "bench" / "results" / "memory.json").read_text())["two_rank_run"]
    if measured["precision"] != "fp32" or measured["settings"]["teacher_width"] != 768:
        pytest.skip("bench/results/memory.json was written with other settings")
    base = BertConfig(vocab_size=30522, hidden_size=768, num_attention_heads=12)
    student = with_labels(student_config(base, StudentShape()), ["a", "b"])
    trained = plan.trained_parameters(student, True, 4, 768)
    assert len(measured["stages"]) == 4
    for stage in measured["stages"]:
        assert trained == stage["parameters"]
        estimate = plan.model_state_bytes(trained, "fp32", stage["zero_stage"], world_size=2)
        for rank in stage["ranks"]:
            for ours, theirs in (("parameters", "param_bytes_local"),
                                 ("optimizer_states", "optimizer_state_bytes_local")):
                assert abs(estimate[ours] - rank[theirs]) <= 0.25 * rank[theirs], (stage["zero_stage"], ours)
                assert abs(estimate[ours] - rank[theirs]) <= 64  # in fact equal up to DeepSpeed's padding
