"""Elastic resume: ``--resume`` at another world size under ZeRO, through the real launcher.

A run of W ranks stops half-way (``--stop_after_steps``); ``--resume`` continues it with W'
ranks (ZeRO-partitioned optimizer state goes through DeepSpeed's universal checkpoint, the
global batch is kept, the data position converted, the bank re-sharded).

What "equal to an uninterrupted run" means when W changes. The resumed run keeps the saved
accumulation and scales the micro batch, so every optimizer step sees the same global batch and
the same global micro-batches (batch negatives come from those) as a run at W'. Dropout masks
are drawn per rank, so the test students have no dropout. Then:

* task distillation, and general distillation with batch negatives: every step's losses equal
  those of an uninterrupted run at W';
* general distillation with the memory bank: the bank's draw is a function of its contents, not
  of the world size, but where an enqueued row lands is not (rows stay in the groups of the rank
  that produced them), so runs at W and W' fill their banks differently once it is in use. The
  resumed run's first step draws from the re-sharded bank exactly what the uninterrupted run at
  W draws: steps up to and including it must equal that run's; later steps fill the bank the W'
  way and are only checked to run.

What remains is fp32 summation order (gradients averaged over another number of ranks);
``RTOL`` bounds it per step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tests.helpers import GLUE, SHARED_DATA, dropout_free_student, launch, make_tiny_sst2_teacher, make_wiki_corpus, \
    offline_teacher_dir, scalar_curves, tail

RTOL = 1e-4  # per-step loss, resumed at another world size vs uninterrupted (fp32, CPU; measured below 1e-5)
# bf16: the same comparison; a forward's rounding and gradient sums over another number of ranks
# now differ at bf16's 8 bits (measured: 3.5e-3 on the soft loss, 1.6e-4 on the hard one)
HALF_RTOL = {"bf16": 1e-2}
STEPS, STOP = 6, 3
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
WIKI = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
pytestmark = pytest.mark.skipif(not (GLUE.is_dir() and WIKI.is_file()), reason="shared GLUE / WikiText-2 data missing")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("elastic")
    return {"sst2_teacher": make_tiny_sst2_teacher(root / "sst2_teacher"),
            "student": dropout_free_student(root / "student"),
            "corpus": make_wiki_corpus(root, 200, 32, offline_teacher_dir())}


def recipe_args(recipe: str, stage: int, out: Path, models: dict, micro: int,
                precision: str = "fp32") -> tuple[str, list[str]]:
    common = ["--ds_config", f"ds_configs/z{stage}.json", "--precision", precision, "--output_dir", str(out), "--student",
              str(models["student"]), "--micro_batch_size", str(micro), "--max_steps", str(STEPS),
              "--log_steps", "1", "--save_steps", "0", "--learning_rate", "1e-3"]
    if stage == 3:  # gradient perturbation needs dL/de, which ZeRO-3 hides (refused at start-up)
        common += ["--perturb", "false"]
    if recipe == "glue":
        return "finetune/glue.py", [*common, "--task", "sst2", "--data_dir", str(GLUE / "SST-2"), "--teacher",
                                    str(models["sst2_teacher"]), "--teacher_gate", "false", "--max_train_samples",
                                    "128", "--max_eval_samples", "32", "--max_test_samples", "0",
                                    "--max_seq_length", "32", "--stage1_fraction", "0.5"]
    negatives = (["--negatives", "bank", "--bank_size", "32", "--bank_groups", "2"] if recipe == "pretrain-bank"
                 else ["--negatives", "batch"])
    return "pretrain/general_distill.py", [*common, "--teacher", offline_teacher_dir(), "--corpus",
                                           str(models["corpus"]), "--max_seq_length", "32", *negatives,
                                           "--num_negatives", "7", "--warmup", "1"]


def run(script: str, args: list[str], ranks: int):
    proc = launch(script, args, num_ranks=ranks, timeout=900, env=ENV)
    assert proc.returncode == 0, tail(proc)
    return proc


def relative_gap(ours: dict[int, float], theirs: dict[int, float], steps: int) -> float:
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    return max(abs(ours[s] - theirs[s]) / max(abs(theirs[s]), 1e-12) for s in range(1, steps + 1))


CASES = [pytest.param("glue", 2, 2, 1, "fp32", id="glue-zero2-2to1"),
         pytest.param("glue", 3, 2, 1, "fp32", id="glue-zero3-2to1", marks=pytest.mark.slow),
         pytest.param("pretrain-bank", 2, 2, 1, "fp32", id="pretrain-bank-zero2-2to1", marks=pytest.mark.slow),
         pytest.param("pretrain-batch", 2, 1, 2, "fp32", id="pretrain-batch-zero2-1to2", marks=pytest.mark.slow),
         pytest.param("glue", 2, 1, 2, "fp32", id="glue-zero2-1to2", marks=pytest.mark.slow),
         pytest.param("glue", 3, 1, 2, "fp32", id="glue-zero3-1to2", marks=pytest.mark.slow),
         pytest.param("pretrain-bank", 3, 1, 2, "fp32", id="pretrain-bank-zero3-1to2", marks=pytest.mark.slow),
         pytest.param("glue", 1, 2, 1, "fp32", id="glue-zero1-2to1", marks=pytest.mark.slow),
         pytest.param("pretrain-batch", 1, 2, 1, "fp32", id="pretrain-batch-zero1-2to1", marks=pytest.mark.slow),
         pytest.param("pretrain-bank", 1, 1, 2, "fp32", id="pretrain-bank-zero1-1to2", marks=pytest.mark.slow),
         pytest.param("pretrain-batch", 3, 2, 1, "fp32", id="pretrain-batch-zero3-2to1", marks=pytest.mark.slow),
         # mixed precision: DeepSpeed's bf16 path (fp32 master weights in the ZeRO optimizer) through
         # the universal checkpoint. fp16 cannot run on these CPUs (DeepSpeed needs AVX512-FP16;
         # refused at start-up), so its elastic resume is not tested here
         pytest.param("glue", 2, 2, 1, "bf16", id="glue-zero2-2to1-bf16", marks=pytest.mark.slow),
         pytest.param("pretrain-bank", 2, 2, 1, "bf16", id="pretrain-bank-zero2-2to1-bf16", marks=pytest.mark.slow),
         pytest.param("glue", 1, 1, 2, "bf16", id="glue-zero1-1to2-bf16", marks=pytest.mark.slow)]


@pytest.mark.parametrize("recipe,stage,saved_world,new_world,precision", CASES)
def test_resume_at_another_world_size_continues_the_uninterrupted_run(recipe, stage, saved_world, new_world,
                                                                      precision, models, tmp_path):
    global_micro_batch = 8  # the same global micro-batches (and global batch) at either world size
    bank = recipe == "pretrain-bank"
    reference_world = saved_world if bank else new_world  # see the module docstring
    script, reference_args = recipe_args(recipe, stage, tmp_path / "reference", models,
                                         global_micro_batch // reference_world, precision)
    run(script, reference_args, reference_world)

    out = tmp_path / "elastic"
    script, args = recipe_args(recipe, stage, out, models, global_micro_batch // saved_world, precision)
    run(script, [*args, "--stop_after_steps", str(STOP)], saved_world)
    step = out / "checkpoints" / f"step-{STOP:07d}"
    files_before = {p.name: p.stat().st_size for p in step.iterdir()}
    # the same command line at the new world size: the micro batch is adjusted, and said
    resumed = run(script, [*args, "--resume"], new_world)
    line = next(line for line in resumed.stdout.splitlines() if "elastic resume:" in line)
    assert (f"saved by {saved_world} ranks, resumed by {new_world}; global batch {global_micro_batch} kept as micro "
            f"batch {global_micro_batch // new_world} x accumulation 1 x {new_world} ranks") in line, line
    assert ("universal checkpoint" in line) == (stage > 0), line
    assert {p.name: p.stat().st_size for p in step.iterdir()} == files_before  # the original is only read
    assert (out / "checkpoints" / f"step-{STOP:07d}.universal").is_dir()
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())

    ours, theirs = scalar_curves(out / "tensorboard"), scalar_curves(tmp_path / "reference" / "tensorboard")
    tags = ["loss/total", "loss/cos"] + (["loss/hard", "loss/soft"] if recipe == "glue" else [])
    compared = STOP + 1 if bank else STEPS
    gaps = {tag: relative_gap(ours[tag], theirs[tag], compared) for tag in tags}
    print(f"{recipe} ZeRO-{stage} {precision} {saved_world}->{new_world}: largest relative gap per tag over steps 1-{compared} "
          f"{gaps}")
    if bank:
        assert ours["bank/in_use"][STOP + 1] == 1.0 and ours["bank/fill"] == theirs["bank/fill"]
    assert all(gap <= HALF_RTOL.get(precision, RTOL) for gap in gaps.values()), gaps
    assert ours["train/lr"] == pytest.approx(theirs["train/lr"], rel=1e-9)
    if recipe == "glue":
        ours_eval = json.loads((out / "eval_results.json").read_text())["dev"]
        theirs_eval = json.loads((tmp_path / "reference" / "eval_results.json").read_text())["dev"]
        assert ours_eval == pytest.approx(theirs_eval, abs=1 / 32 + 1e-9)  # at most one of 32 dev rows flips
    assert math.isfinite(ours["loss/total"][STEPS])
    assert os.path.isdir(out / "model")


# ------------------------------------------------------------------------------------ no launcher

def test_elastic_batch_keeps_the_global_batch():
    from lrcbert.errors import UserError
    from lrcbert.runtime.checkpoints import elastic_batch

    assert elastic_batch(16, 1, 1, 8, 1) == (16, 1)  # 8 x 2 ranks -> 1 rank: the global micro-batch is kept
    assert elastic_batch(16, 1, 4, 8, 1) == (4, 1)
    assert elastic_batch(16, 2, 1, 4, 2) == (8, 2)  # the saved accumulation is kept
    assert elastic_batch(16, 1, 1, 4, 4) == (4, 4)  # flags that give the global batch are used as given
    assert elastic_batch(24, 8, 2, 3, 8) == (3, 4)  # 12 per rank: accumulation 8 does not divide; micro 3 does
    with pytest.raises(UserError, match="global batch 16 cannot be split over 3 ranks"):
        elastic_batch(16, 1, 3, 8, 1)


def test_prune_removes_a_universal_conversion_with_its_checkpoint(tmp_path):
    from lrcbert.runtime.checkpoints import prune

    for name in ("step-0000002", "step-0000002.universal", "step-0000004", "step-0000004.universal", "step-0000006",
                 ".tmp-step-0000004.universal"):
        (tmp_path / name).mkdir()
    prune(str(tmp_path), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000004", "step-0000004.universal", "step-0000006"]
