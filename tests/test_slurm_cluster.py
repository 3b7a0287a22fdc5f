"""A real SLURM cluster on this machine: sbatch, srun, multi-node gloo, requeue, teardown.

Run: ``python -m pytest -q -m slurm tests/test_slurm_cluster.py`` (as root, after
``.ci/install_slurm.sh``).  Skips with the reason when the cluster cannot run here.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from tests.slurm_cluster import (OneNodeCluster, TwoNodeCluster, free_port,
                                     parse_scontrol_record, skip_reason)
except ImportError:  # tests/ on sys.path (pytest's rootdir-less "prepend" import)
    from slurm_cluster import (OneNodeCluster, TwoNodeCluster, free_port,
                               parse_scontrol_record, skip_reason)

from tests.helpers import timeout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ALLREDUCE = REPO / "tests" / "dist_scripts" / "allreduce.sbatch"

_ONE = skip_reason()
_TWO = skip_reason(two_nodes=True)
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_ONE is not None, reason=_ONE or "")]
needs_netns = pytest.mark.skipif(_TWO is not None, reason=_TWO or "")




def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _netns_mounts():
    with open("/proc/self/mountinfo") as f:
        return sorted(l.split()[4] for l in f if "/run/netns" in l.split()[4])


def _job_env(cluster, **extra):
    env = {"PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _read_ranks(out_dir, world):
    recs = []
    for r in range(world):
        p = Path(out_dir) / f"rank{r}.json"
        assert p.exists(), f"rank {r} wrote no result ({p})"
        recs.append(json.loads(p.read_text()))
    return recs


@pytest.fixture(scope="module")
def one_node():
    with OneNodeCluster(cpus=2) as c:
        yield c


# ----------------------------------------------------------------------------- one node
@timeout(60)
def test_one_node_runs_jobs_and_reports_exit_codes(one_node, tmp_path):
    assert one_node.sinfo() == {one_node.hostname: "idle"}
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/bash\nsrun hostname\n")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\necho about to fail\nexit 3\n")
    j_ok = one_node.sbatch(ok, options=["-o", str(tmp_path / "ok.out")], cwd=tmp_path)
    j_bad = one_node.sbatch(bad, options=["-o", str(tmp_path / "bad.out")], cwd=tmp_path)
    assert one_node.wait(j_ok, timeout=30) == "COMPLETED"
    assert one_node.job_info(j_ok)["ExitCode"] == "0:0"
    assert (tmp_path / "ok.out").read_text().split() == [one_node.hostname]
    assert one_node.wait(j_bad, timeout=30) == "FAILED"
    assert one_node.job_info(j_bad)["ExitCode"] == "3:0"
    # the record parser copes with values holding spaces
    rec = parse_scontrol_record(one_node.scontrol("show", "job", "-o", str(j_ok)))
    assert rec["JobId"] == str(j_ok) and rec["JobState"] == "COMPLETED"


@timeout(90)
def test_one_node_two_tasks_gloo_allreduce(one_node, tmp_path):
    out = tmp_path / "ranks"
    jid = one_node.sbatch(
        ALLREDUCE, str(out),
        options=["--ntasks", "2", "-o", str(tmp_path / "job.out")],
        env=_job_env(one_node, MASTER_PORT=free_port()),
        cwd=REPO,
    )
    state = one_node.wait(jid, timeout=75)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", log
    recs = _read_ranks(out, 2)
    assert sorted(r["rank"] for r in recs) == [0, 1]
    assert sorted(r["local_rank"] for r in recs) == [0, 1]
    assert {r["hostname"] for r in recs} == {one_node.hostname}
    assert all(r["world_size"] == 2 and r["result"] == 3.0 for r in recs), recs


@timeout(90)
def test_requeued_job_runs_again(one_node, tmp_path):
    marks = tmp_path / "restarts.txt"
    script = tmp_path / "requeue.sh"
    # First run records restart count 0 and then waits to be requeued; the rerun
    # records 1 and finishes.
    script.write_text(
        "#!/bin/bash\n"
        f"echo \"${{SLURM_RESTART_COUNT:-0}}\" >> {marks}\n"
        "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then sleep 300; fi\n"
    )
    jid = one_node.sbatch(
        script, options=["--requeue", "-o", str(tmp_path / "job-%j.out")], cwd=tmp_path
    )
    deadline = time.monotonic() + 30
    while not (marks.exists() and marks.read_text().strip()):
        assert time.monotonic() < deadline, "first run never started"
        time.sleep(0.2)
    assert one_node.job_state(jid) == "RUNNING"
    one_node.requeue(jid)
    assert one_node.wait(jid, timeout=60) == "COMPLETED"
    assert marks.read_text().split() == ["0", "1"]
    info = one_node.job_info(jid)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"


@timeout(60)
def test_one_node_teardown_is_clean(tmp_path):
    before_hosts = Path("/etc/hosts").read_bytes()
    with OneNodeCluster(cpus=2) as c:
        pids = [c._ctld.pid, c._munged.pid, *[p.pid for p in c._slurmds.values()]]
        workdir = c.dir
        script = tmp_path / "long.sh"
        script.write_text("#!/bin/bash\nsrun sleep 613.37\n")
        jid = c.sbatch(script, options=["-o", str(tmp_path / "long.out")], cwd=tmp_path)
        assert c.wait(jid, timeout=30, states=["RUNNING"]) == "RUNNING"
        token = c.token
    assert not any(_alive(p) for p in pids)
    assert not workdir.exists()
    assert Path("/etc/hosts").read_bytes() == before_hosts
    # no process of that cluster survives (job steps included)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(workdir) not in ps and "sleep 613.37" not in ps
    leftovers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if f"LRCBERT_SLURM_CLUSTER={token}".encode() in env:
                leftovers.append(entry)
    assert leftovers == []


# ----------------------------------------------------------------------------- two nodes
@needs_netns
@timeout(120)
def test_two_nodes_gloo_allreduce_over_tcp(tmp_path):
    before_hosts = Path("/etc/hosts").read_bytes()
    before_netns = (os.path.isdir("/run/netns"), _netns_mounts())
    out = tmp_path / "ranks"
    with TwoNodeCluster() as c:
        assert c.sinfo() == {"node1": "idle", "node2": "idle"}
        jid = c.sbatch(
            ALLREDUCE, str(out),
            options=["--nodes", "2", "--ntasks-per-node", "1",
                     "-o", str(tmp_path / "job.out")],
            env=_job_env(c, GLOO_SOCKET_IFNAME=c.gloo_ifname),
            cwd=REPO,
        )
        state = c.wait(jid, timeout=90)
        log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
        assert state == "COMPLETED", log + c.logs()
        recs = _read_ranks(out, 2)
        names = dict(c.addr)
        netns, bridge, pids = dict(c.netns), c.bridge, [c._ctld.pid, c._munged.pid]
        pids += [p.pid for p in c._slurmds.values()]
    by_rank = {r["rank"]: r for r in recs}
    # one rank per node, on two different hosts, each using its namespace address
    assert by_rank[0]["hostname"] == "node1" and by_rank[1]["hostname"] == "node2"
    assert by_rank[0]["hostname"] != by_rank[1]["hostname"]
    for r in recs:
        assert r["local_rank"] == 0 and r["world_size"] == 2
        assert r["master_addr"] == "node1"
        assert r["local_addr"] == names[r["hostname"]]
        assert r["result"] == 3.0
    # teardown: daemons gone, namespaces / bridge / hosts lines removed
    assert not any(_alive(p) for p in pids)
    ns_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in ns_list for ns in netns.values())
    link = subprocess.run(["ip", "link", "show", bridge], capture_output=True, text=True)
    assert link.returncode != 0
    assert Path("/etc/hosts").read_bytes() == before_hosts
    # `ip netns add` bind-mounts /run/netns onto itself on first use: undone as well
    assert (os.path.isdir("/run/netns"), _netns_mounts()) == before_netns
