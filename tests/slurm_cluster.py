"""Start a REAL SLURM cluster on this machine, for tests that ``sbatch`` our scripts.

Two flavours, both context managers::

    from slurm_cluster import OneNodeCluster, TwoNodeCluster, skip_reason

    with OneNodeCluster(cpus=2) as c:            # slurmctld + 1 slurmd on 127.0.0.1
        jid = c.sbatch("job.sbatch", "arg1", options=["--ntasks", "2"],
                       env={"FOO": "1"}, cwd=repo_root)
        state = c.wait(jid, timeout=120)         # "COMPLETED", "FAILED", ...
        info = c.job_info(jid)                   # {"JobState": ..., "ExitCode": "0:0", ...}

    with TwoNodeCluster() as c:                  # 2 slurmd in 2 network namespaces
        jid = c.sbatch("job.sbatch", options=["--nodes", "2", "--ntasks-per-node", "1"])

What it starts (all private to one instance, nothing system-wide is overwritten):

* a private ``munged`` (user munge) with its own key, socket, pid, seed and log files
  in a temporary directory; Slurm is pointed at it with ``AuthInfo=socket=...``;
* a ``slurm.conf`` in that directory; every command gets it through ``SLURM_CONF``
  (``/etc/slurm/slurm.conf`` is never touched);
* ``slurmctld -D`` and ``slurmd -D -N <node>`` as children of this process, on free ports;
* TwoNodeCluster only: a Linux bridge holding the controller address, two network
  namespaces joined to it by veth pairs (the namespace end is named ``lrc0``), one
  ``slurmd`` per namespace started with ``nsenter --net=... unshare --uts`` (own
  hostname), and one /etc/hosts line per node (marked, removed again on exit).

Teardown cancels the cluster's jobs, stops the daemons it started, kills leftover
processes of *this* cluster only (identified by a per-instance token in their
environment, or by living in one of its namespaces), deletes the namespaces, veths and
bridge it created, removes exactly the /etc/hosts lines it added and deletes the
temporary directory.  Instances are serialised across processes with a lock file.

Set ``LRCBERT_SLURM_KEEP=1`` to keep the temporary directory (configs, logs) after exit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "OneNodeCluster",
    "TwoNodeCluster",
    "SlurmCluster",
    "SlurmError",
    "skip_reason",
    "TERMINAL_STATES",
    "free_port",
    "parse_scontrol_record",
]

#: Job states after which a job never runs again (unless requeued by hand).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
    }
)

_BASE_BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmstepd",
    "sbatch",
    "srun",
    "scontrol",
    "squeue",
    "scancel",
    "sinfo",
    "munged",
    "mungekey",
)
_NET_BINARIES = ("ip", "nsenter", "unshare")
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/local/bin")
_LOCK_PATH = "/run/lock/lrcbert-slurm-cluster.lock"
_HOSTS_PATH = "/etc/hosts"
_HOSTS_MARK = "# lrcbert-slurm-test"
_TOKEN_VAR = "LRCBERT_SLURM_CLUSTER"
_NETNS_DIR = "/run/netns"


# Per-process lock state, kept in a synthetic module so that every copy of this file
# (imported as `slurm_cluster` and as `tests.slurm_cluster`) shares it.
_STATE = sys.modules.setdefault("_lrcbert_slurm_cluster_state",
                                types.ModuleType("_lrcbert_slurm_cluster_state"))
if not hasattr(_STATE, "_lock_users"):
    _STATE._lock_fd_shared = None
    _STATE._lock_users = 0
    _STATE._live_tokens = set()


class SlurmError(RuntimeError):
    """A cluster failed to start, a command failed, or a job did not finish in time."""


# ----------------------------------------------------------------------------- helpers
def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=os.pathsep.join([path, *_EXTRA_PATH]))


def skip_reason(two_nodes: bool = False) -> str | None:
    """Why a cluster cannot run here (a string for ``pytest.skip``), or None if it can."""
    if not sys.platform.startswith("linux"):
        return "SLURM test cluster needs Linux"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (it starts slurmctld/slurmd/munged)"
    names = _BASE_BINARIES + (_NET_BINARIES if two_nodes else ())
    missing = [n for n in names if _which(n) is None]
    if missing:
        return (
            "SLURM/munge binaries missing: " + ", ".join(missing)
            + " (run .ci/install_slurm.sh)"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (install the munge package)"
    if two_nodes and not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespaces"
    return None


def _free_port(host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> int:
    excl = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            port = s.getsockname()[1]
        # Also make sure nothing listens on the wildcard address with that port.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        if port not in excl and port > 1024:
            return port
    raise SlurmError("could not find a free TCP port")


def free_port() -> int:
    """A currently unused TCP port on this machine (e.g. for MASTER_PORT)."""
    return _free_port()


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no file)"
    return "\n".join(lines[-n:])


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` line into a dict (``Key=Value`` pairs).

    Values may contain spaces (e.g. ``Command=``), so a token without ``=`` is glued to
    the previous value.
    """
    out: dict[str, str] = {}
    last = None
    for tok in text.strip().split(" "):
        if not tok:
            continue
        m = re.match(r"^([A-Za-z][A-Za-z0-9_:/]*)=(.*)$", tok)
        if m:
            last = m.group(1)
            out[last] = m.group(2)
        elif last is not None:
            out[last] += " " + tok
    return out


def _pids_with_env_token(token: str) -> list[int]:
    needle = f"{_TOKEN_VAR}={token}".encode() + b"\0"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env or env.endswith(needle[:-1]):
            found.append(pid)
    return found


def _is_mountpoint(path: str) -> bool:
    """True if ``path`` is a mount point (bind mounts of the same fs included)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mnt = line.split()[4].replace("\\040", " ")
                if mnt == real:
                    return True
    except OSError:
        pass
    return False


def _pids_in_netns(netns_path: str) -> list[int]:
    try:
        ino = os.stat(netns_path).st_ino
    except OSError:
        return []
    want = f"net:[{ino}]"
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == want:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _kill_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if _alive(p)]
        if not live:
            return
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in live):
            time.sleep(0.05)


# ----------------------------------------------------------------------------- cluster
class SlurmCluster:
    """Base class; use :class:`OneNodeCluster` or :class:`TwoNodeCluster`."""

    partition = "debug"

    def __init__(
        self,
        *,
        cpus_per_node: int = 2,
        start_timeout: float = 60.0,
        lock_timeout: float = 600.0,
        cred_expire: int = 10,
        keep_dir: bool | None = None,
    ) -> None:
        reason = skip_reason(two_nodes=self._needs_netns)
        if reason:
            raise SlurmError(reason)
        self.cpus_per_node = int(cpus_per_node)
        self.start_timeout = start_timeout
        self.lock_timeout = lock_timeout
        # After `scontrol requeue` a job stays ineligible for cred_expire+1 seconds
        # (Slurm's default cred_expire is 120 s, far too long for tests).
        self.cred_expire = int(cred_expire)
        if keep_dir is None:
            keep_dir = os.environ.get("LRCBERT_SLURM_KEEP", "") not in ("", "0")
        self.keep_dir = keep_dir
        self.token = secrets.token_hex(3)
        self.hostname = socket.gethostname()
        self.dir: Path | None = None
        self.conf_path: Path | None = None
        self.ctld_port = 0
        self.slurmd_port = 0
        self._lock_held = False
        self._munged: subprocess.Popen | None = None
        self._ctld: subprocess.Popen | None = None
        self._slurmds: dict[str, subprocess.Popen] = {}
        self._started = False
        self._bin = {n: _which(n) for n in _BASE_BINARIES + _NET_BINARIES}

    # ---- to be provided by subclasses
    _needs_netns = False

    @property
    def node_names(self) -> list[str]:
        raise NotImplementedError

    def _controller_addr(self) -> str:
        raise NotImplementedError

    def _node_lines(self) -> list[str]:
        raise NotImplementedError

    def _setup_network(self) -> None:
        pass

    def _teardown_network(self) -> list[str]:
        return []

    def _slurmd_argv(self, node: str) -> list[str]:
        raise NotImplementedError

    def _stray_pids(self) -> list[int]:
        return _pids_with_env_token(self.token)

    #: Value for GLOO_SOCKET_IFNAME that works inside this cluster's jobs.
    gloo_ifname = "lo"

    # ---- context manager
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except SlurmError as e:
            if exc_type is None:
                raise
            # do not mask the exception that ended the with-block
            sys.stderr.write(f"slurm_cluster: {e}\n")

    # ---- environment / commands
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and the cluster token) for Slurm client commands."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        env[_TOKEN_VAR] = self.token
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_EXTRA_PATH])
        return env

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command with this cluster's SLURM_CONF; raise SlurmError on failure."""
        full_env = self.env
        if env:
            full_env.update({k: str(v) for k, v in env.items()})
        argv = [str(a) for a in argv]
        exe = self._bin.get(argv[0]) or argv[0]
        proc = subprocess.run(
            [exe, *argv[1:]], env=full_env, cwd=cwd, capture_output=True, text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise SlurmError(
                f"{' '.join(argv)} failed (rc={proc.returncode}):\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def scontrol(self, *args: str, check: bool = True) -> str:
        """``scontrol ARGS...`` against this cluster; returns stdout."""
        return self.run(["scontrol", *args], check=check).stdout

    def sinfo(self) -> dict[str, str]:
        """{node name: state} as reported by ``sinfo -N``."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout
        res = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                res[parts[0]] = parts[1]
        return res

    def sbatch(self, script_path: str | os.PathLike, *args: str,
               env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None,
               options: Sequence[str] = ()) -> int:
        """Submit ``sbatch [options] script_path args...``; return the job id.

        ``args`` are the batch script's own arguments; sbatch options (``--nodes 2``,
        ``-o out.txt``, ``--requeue`` ...) go in ``options``.  The job gets the current
        environment plus ``env`` (sbatch's default ``--export=ALL``) and this cluster's
        SLURM_CONF, so ``srun``/``scontrol`` inside the job talk to this cluster.
        ``cwd`` is the submit directory (the job's working directory).
        """
        proc = self.run(
            ["sbatch", "--parsable", *options, os.fspath(script_path), *args],
            env=env, cwd=cwd,
        )
        first = proc.stdout.strip().splitlines()[-1]
        return int(first.split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str] | None:
        """``scontrol show job -o`` as a dict, or None if the controller forgot the job."""
        proc = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        return parse_scontrol_record(proc.stdout.strip().splitlines()[0])

    def job_state(self, job_id: int) -> str | None:
        info = self.job_info(job_id)
        return None if info is None else info.get("JobState")

    def wait(self, job_id: int, timeout: float = 120.0,
             states: Iterable[str] = TERMINAL_STATES, poll: float = 0.3) -> str:
        """Wait until the job's JobState is one of ``states`` (default: terminal).

        Returns the state (``"COMPLETED"``, ``"FAILED"``, ``"RUNNING"``...); the exit
        code is in ``job_info(job_id)["ExitCode"]`` (``"0:0"`` = exit 0, no signal).
        Raises SlurmError on timeout or if the job disappears.
        """
        want = {s.upper() for s in states}
        deadline = time.monotonic() + timeout
        info = None
        while True:
            info = self.job_info(job_id)
            if info is None:
                raise SlurmError(f"job {job_id} is unknown to slurmctld\n{self.logs()}")
            state = info.get("JobState", "")
            if state in want:
                return state
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} not in {sorted(want)} after {timeout}s: {info}\n"
                    f"{self.logs()}"
                )
            time.sleep(poll)

    def requeue(self, job_id: int) -> None:
        """``scontrol requeue JOBID`` (the job runs again after ~cred_expire seconds)."""
        self.scontrol("requeue", str(job_id))

    def scancel(self, *job_ids: int) -> None:
        self.run(["scancel", *[str(j) for j in job_ids]], check=False)

    def active_jobs(self) -> list[int]:
        out = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout
        return [int(x.split("_")[0]) for x in out.split() if x.split("_")[0].isdigit()]

    def logs(self, n: int = 30) -> str:
        """Tails of the daemon logs (for error messages)."""
        if self.dir is None:
            return ""
        parts = []
        for p in sorted((self.dir / "log").glob("*")):
            parts.append(f"--- {p.name} ---\n{_tail(p, n)}")
        return "\n".join(parts)

    # ---- lifecycle
    def start(self) -> "SlurmCluster":
        if self._started:
            return self
        self._acquire_lock()
        try:
            self._started = True
            self.dir = Path(tempfile.mkdtemp(prefix=f"lrcbert-slurm-{self.token}-"))
            os.chmod(self.dir, 0o755)  # munge user must traverse it to its socket
            (self.dir / "log").mkdir()
            (self.dir / "state").mkdir()
            for n in self.node_names:
                (self.dir / f"slurmd.{n}").mkdir()
            self._start_munged()
            self._setup_network()
            self.ctld_port = _free_port()
            self.slurmd_port = _free_port(exclude=[self.ctld_port])
            self._write_conf()
            self._start_slurmctld()
            for n in self.node_names:
                self._start_slurmd(n)
            self._wait_nodes_idle()
        except BaseException:
            logs = self.logs()
            with contextlib.suppress(Exception):
                self.stop()
            if logs:
                sys.stderr.write(f"SLURM cluster failed to start; daemon logs:\n{logs}\n")
            raise
        return self

    def stop(self) -> None:
        """Tear down everything this instance started (safe to call more than once)."""
        if not self._started:
            return
        errors: list[str] = []

        def attempt(what, fn, *a):
            try:
                return fn(*a)
            except Exception as e:  # keep tearing down the rest
                errors.append(f"{what}: {e!r}")

        if self._ctld is not None and self._ctld.poll() is None:
            attempt("cancel jobs", self._cancel_all_jobs)
        for name, proc in list(self._slurmds.items()):
            attempt(f"stop slurmd {name}", self._stop_proc, proc)
        if self._ctld is not None:
            attempt("stop slurmctld", self._stop_proc, self._ctld)
        attempt("kill leftover job processes", lambda: _kill_pids(self._stray_pids()))
        if self._munged is not None:
            attempt("stop munged", self._stop_proc, self._munged)
        errors.extend(attempt("network teardown", self._teardown_network) or [])
        if self.dir is not None and not self.keep_dir:
            attempt("remove temp dir", shutil.rmtree, self.dir)
        self._slurmds.clear()
        self._ctld = self._munged = None
        self._started = False
        self._release_lock()
        if errors:
            raise SlurmError("teardown problems:\n" + "\n".join(errors))

    # ---- internals
    # One flock per process, shared by all live instances of this process (so a test
    # module can hold a OneNodeCluster fixture while a test starts a TwoNodeCluster);
    # other processes wait for it.  The state lives in _STATE (see above), so it is
    # shared even if this file is imported twice under different module names.

    def _acquire_lock(self) -> None:
        st = _STATE
        if st._lock_users == 0:
            os.makedirs(os.path.dirname(_LOCK_PATH), exist_ok=True)
            fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # The last holder unlinks the file on release: make sure we locked
                    # the file that is still at _LOCK_PATH, else start over.
                    try:
                        same = os.stat(_LOCK_PATH).st_ino == os.fstat(fd).st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        break
                    os.close(fd)
                    fd = os.open(_LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o644)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise SlurmError(
                            f"another process's test cluster holds {_LOCK_PATH}"
                        )
                    time.sleep(0.5)
            st._lock_fd_shared = fd
        st._lock_users += 1
        st._live_tokens.add(self.token)
        self._lock_held = True

    def _release_lock(self) -> None:
        st = _STATE
        if not getattr(self, "_lock_held", False):
            return
        self._lock_held = False
        st._live_tokens.discard(self.token)
        st._lock_users -= 1
        if st._lock_users == 0 and st._lock_fd_shared is not None:
            with contextlib.suppress(OSError):
                os.unlink(_LOCK_PATH)  # we created it (or took it over): leave nothing
            with contextlib.suppress(OSError):
                fcntl.flock(st._lock_fd_shared, fcntl.LOCK_UN)
                os.close(st._lock_fd_shared)
            st._lock_fd_shared = None

    def _daemon_env(self) -> dict[str, str]:
        env = self.env
        env.pop("SLURM_JOB_ID", None)
        return env

    def _popen(self, argv: Sequence[str], logname: str, **kw) -> subprocess.Popen:
        out = open(self.dir / "log" / logname, "ab")
        try:
            return subprocess.Popen(
                [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env=kw.pop("env", self._daemon_env()), **kw,
            )
        finally:
            out.close()

    def _stop_proc(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def _start_munged(self) -> None:
        mdir = self.dir / "munge"
        mdir.mkdir()
        key = mdir / "munge.key"
        subprocess.run([self._bin["mungekey"], "-c", "-k", str(key)], check=True,
                       capture_output=True)
        ent = pwd.getpwnam("munge")
        for p in (mdir, key):
            os.chown(p, ent.pw_uid, ent.pw_gid)
        os.chmod(mdir, 0o755)  # socket dir: execute permission for all is required
        os.chmod(key, 0o600)
        self.munge_socket = mdir / "munge.socket"
        self._munged = self._popen(
            [
                self._bin["munged"], "--foreground",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}", f"--seed-file={mdir / 'munged.seed'}",
                f"--log-file={mdir / 'munged.log'}",
            ],
            "munged.log", user=ent.pw_uid, group=ent.pw_gid, extra_groups=[],
        )
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self._munged.poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start:\n{self.logs()}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        d = self.dir
        plug = d / "plugstack.conf"
        plug.write_text("")
        lines = [
            f"ClusterName=lrcbert{self.token}",
            f"SlurmctldHost={self.hostname}({self._controller_addr()})",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d}/slurmd.%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.%n.log",
            f"PlugStackConfig={plug}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            # run the main scheduler every 2 s, not 60 s (a requeued job becomes
            # eligible without any event that would trigger scheduling)
            "SchedulerParameters=sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            # finished jobs stay visible to `scontrol show job` for an hour
            "MinJobAge=3600",
            "KillWait=5",
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            *self._node_lines(),
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE "
            "State=UP OverSubscribe=NO",
        ]
        self.conf_path = d / "slurm.conf"
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _start_slurmctld(self) -> None:
        self._ctld = self._popen(
            [self._bin["slurmctld"], "-D", "-c", "-f", self.conf_path], "slurmctld.out"
        )

    def _start_slurmd(self, node: str) -> None:
        self._slurmds[node] = self._popen(self._slurmd_argv(node), f"slurmd.{node}.out")

    def _wait_nodes_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        want = set(self.node_names)
        last = {}
        while True:
            for name, proc in [("slurmctld", self._ctld), *self._slurmds.items()]:
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            with contextlib.suppress(SlurmError, subprocess.TimeoutExpired):
                last = self.sinfo()
                if want <= set(last) and all(last[n] == "idle" for n in want):
                    return
            if time.monotonic() > deadline:
                raise SlurmError(f"nodes not idle after {self.start_timeout}s: {last}\n"
                                 f"{self.logs()}")
            time.sleep(0.3)

    def _cancel_all_jobs(self) -> None:
        jobs = self.active_jobs()
        if not jobs:
            return
        self.scancel(*jobs)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not self.active_jobs():
                return
            time.sleep(0.3)


class OneNodeCluster(SlurmCluster):
    """slurmctld + one slurmd (node = this machine's hostname) on 127.0.0.1."""

    def __init__(self, cpus: int = 2, **kw) -> None:
        super().__init__(cpus_per_node=cpus, **kw)

    @property
    def node_names(self) -> list[str]:
        return [self.hostname]

    def _controller_addr(self) -> str:
        return "127.0.0.1"

    def _node_lines(self) -> list[str]:
        c = self.cpus_per_node
        return [
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={c} Sockets=1 "
            f"CoresPerSocket={c} ThreadsPerCore=1 State=UNKNOWN"
        ]

    def _slurmd_argv(self, node: str) -> list[str]:
        return [self._bin["slurmd"], "-D", "-N", node, "-f", str(self.conf_path)]


class TwoNodeCluster(SlurmCluster):
    """slurmctld on a bridge address + two slurmd, each in its own network namespace.

    Nodes ``node1``/``node2`` get addresses .11/.12 of a private /24 (default
    10.213.0.0/24; the next free 10.213.N.0/24 if that one is in use), the controller
    gets .1 on the bridge.  Inside jobs ``hostname`` is the node name, the node names
    resolve through /etc/hosts, and the namespace's interface is ``lrc0``
    (``gloo_ifname``).
    """

    _needs_netns = True
    gloo_ifname = "lrc0"

    def __init__(self, cpus_per_node: int = 2,
                 node_names: Sequence[str] = ("node1", "node2"),
                 subnet: str | None = None, **kw) -> None:
        super().__init__(cpus_per_node=cpus_per_node, **kw)
        if len(node_names) < 1:
            raise ValueError("need at least one node")
        self._names = list(node_names)
        self._subnet_req = subnet
        t = self.token
        self.bridge = f"lrcb{t}"  # <= 15 chars
        self.netns = {n: f"lrcbert-{t}-{n}" for n in self._names}
        self.host_veth = {n: f"lrcv{t}{i}" for i, n in enumerate(self._names)}
        self.addr: dict[str, str] = {}
        self.controller_addr = ""
        self._created_bridge = False
        self._created_ns: list[str] = []
        self._created_veth: list[str] = []
        self._netns_dir_existed = True
        self._netns_dir_was_mount: bool | None = None
        self._hosts_lines: list[str] = []
        self._hosts_original: str | None = None
        self._hosts_written = ""

    @property
    def node_names(self) -> list[str]:
        return list(self._names)

    def _controller_addr(self) -> str:
        return self.controller_addr

    def _node_lines(self) -> list[str]:
        c = self.cpus_per_node
        return [
            f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={c} Sockets=1 "
            f"CoresPerSocket={c} ThreadsPerCore=1 State=UNKNOWN"
            for n in self._names
        ]

    def _slurmd_argv(self, node: str) -> list[str]:
        # Not `ip netns exec`: it remounts /sys, and slurmd then trips over cgroups.
        inner = f"hostname {node} && exec {self._bin['slurmd']} -D -N {node} -f {self.conf_path}"
        return [
            self._bin["nsenter"], f"--net=/run/netns/{self.netns[node]}",
            self._bin["unshare"], "--uts", "sh", "-c", inner,
        ]

    def _stray_pids(self) -> list[int]:
        pids = set(super()._stray_pids())
        for ns in self._created_ns:
            pids.update(_pids_in_netns(f"/run/netns/{ns}"))
        return sorted(pids)

    # ---- network
    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([self._bin["ip"], *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise SlurmError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = []
        for line in self._ip("-o", "-4", "addr", "show").stdout.splitlines():
            m = re.search(r"inet (\S+)", line)
            if m:
                used.append(ipaddress.ip_interface(m.group(1)).network)
        for line in self._ip("-4", "route", "show").stdout.splitlines():
            tok = line.split()[0] if line.split() else ""
            with contextlib.suppress(ValueError):
                if tok != "default":
                    used.append(ipaddress.ip_network(tok, strict=False))
        cands = ([self._subnet_req] if self._subnet_req else
                 [f"10.213.{i}.0/24" for i in range(0, 256)])
        for c in cands:
            net = ipaddress.ip_network(c)
            if not any(net.overlaps(u) for u in used):
                return net
        raise SlurmError(f"no free private subnet among {cands[:3]}...")

    def _setup_network(self) -> None:
        net = self._pick_subnet()
        hosts = list(net.hosts())
        self.controller_addr = str(hosts[0])
        self.prefixlen = net.prefixlen
        for i, n in enumerate(self._names):
            self.addr[n] = str(hosts[10 + i])
        self._add_hosts_entries()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._created_bridge = True
        # `ip netns add` creates /run/netns and bind-mounts it onto itself the first
        # time; remember whether that was already so, to undo it afterwards.
        self._netns_dir_existed = os.path.isdir(_NETNS_DIR)
        self._netns_dir_was_mount = _is_mountpoint(_NETNS_DIR)
        self._ip("addr", "add", f"{self.controller_addr}/{self.prefixlen}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for n in self._names:
            ns = self.netns[n]
            self._ip("netns", "add", ns)
            self._created_ns.append(ns)
            hv = self.host_veth[n]
            self._ip("link", "add", hv, "type", "veth", "peer", "name", "lrc0", "netns", ns)
            self._created_veth.append(hv)
            self._ip("link", "set", hv, "master", self.bridge)
            self._ip("link", "set", hv, "up")
            self._ip("-n", ns, "addr", "add", f"{self.addr[n]}/{self.prefixlen}", "dev", "lrc0")
            self._ip("-n", ns, "link", "set", "lrc0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        # The controller must reach each namespace before slurmd starts.
        for n in self._names:
            self._wait_reachable(self.addr[n])

    def _wait_reachable(self, addr: str, timeout: float = 10.0) -> None:
        # A TCP connect to a closed port gets RST once ARP/bridge forwarding works.
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                try:
                    s.connect((addr, 9))
                    return
                except ConnectionRefusedError:
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise SlurmError(f"namespace address {addr} unreachable from the bridge")
            time.sleep(0.1)

    def _teardown_network(self) -> list[str]:
        errors = []
        for ns in list(self._created_ns):
            # anything still running inside is ours; the namespace holds our veth end
            _kill_pids(_pids_in_netns(f"/run/netns/{ns}"))
            p = self._ip("netns", "del", ns, check=False)
            if p.returncode != 0:
                errors.append(f"ip netns del {ns}: {p.stderr.strip()}")
            else:
                self._created_ns.remove(ns)
        for hv in list(self._created_veth):
            # deleting the namespace removes the pair, asynchronously: it may vanish between show and del
            if self._ip("link", "show", hv, check=False).returncode == 0:
                p = self._ip("link", "del", hv, check=False)
                if p.returncode != 0 and self._ip("link", "show", hv, check=False).returncode == 0:
                    errors.append(f"ip link del {hv}: {p.stderr.strip()}")
                    continue
            self._created_veth.remove(hv)
        if not self._created_ns and self._netns_dir_was_mount is False:
            with contextlib.suppress(OSError):
                if _is_mountpoint(_NETNS_DIR) and not os.listdir(_NETNS_DIR):
                    p = subprocess.run(["umount", _NETNS_DIR], capture_output=True,
                                       text=True)
                    if p.returncode != 0:
                        errors.append(f"umount {_NETNS_DIR}: {p.stderr.strip()}")
                if not self._netns_dir_existed and not _is_mountpoint(_NETNS_DIR):
                    os.rmdir(_NETNS_DIR)
            self._netns_dir_was_mount = None
        if self._created_bridge:
            p = self._ip("link", "del", self.bridge, check=False)
            if p.returncode != 0 and self._ip("link", "show", self.bridge,
                                               check=False).returncode == 0:
                errors.append(f"ip link del {self.bridge}: {p.stderr.strip()}")
            else:
                self._created_bridge = False
        try:
            self._remove_hosts_entries()
        except Exception as e:
            errors.append(f"restore /etc/hosts: {e!r}")
        return errors

    # ---- /etc/hosts
    @staticmethod
    def _write_in_place(path: str, text: str) -> None:
        # In place (not rename): /etc/hosts may be a bind mount.
        with open(path, "r+") as f:
            f.seek(0)
            f.write(text)
            f.truncate()

    def _add_hosts_entries(self) -> None:
        with open(_HOSTS_PATH) as f:
            text = f.read()
        lines = text.splitlines()
        # Lines with our mark whose token belongs to no live instance of this process
        # come from a run that died without teardown (we hold the cross-process lock,
        # so no other process has a live cluster): drop them.
        def is_stale(line: str) -> bool:
            if _HOSTS_MARK not in line:
                return False
            tok = line.split(_HOSTS_MARK, 1)[1].split()
            return not tok or tok[0] not in _STATE._live_tokens

        stale = [l for l in lines if is_stale(l)]
        if stale:
            sys.stderr.write(f"slurm_cluster: removing stale /etc/hosts lines {stale}\n")
            lines = [l for l in lines if not is_stale(l)]
        for l in lines:
            fields = l.split("#", 1)[0].split()
            clash = set(fields[1:]) & set(self._names)
            if clash:
                raise SlurmError(
                    f"/etc/hosts already maps {sorted(clash)} ({l!r}); pick other "
                    "node_names for TwoNodeCluster"
                )
        self._hosts_lines = [
            f"{self.addr[n]}\t{n}\t{_HOSTS_MARK} {self.token}" for n in self._names
        ]
        new = "\n".join(lines + self._hosts_lines) + "\n"
        self._hosts_original = None if stale else text
        self._hosts_written = new
        self._write_in_place(_HOSTS_PATH, new)

    def _remove_hosts_entries(self) -> None:
        if not self._hosts_lines:
            return
        with open(_HOSTS_PATH) as f:
            text = f.read()
        if text == self._hosts_written and self._hosts_original is not None:
            # untouched since we wrote it: put back the original bytes exactly
            self._write_in_place(_HOSTS_PATH, self._hosts_original)
            self._hosts_lines = []
            return
        mine = set(self._hosts_lines)
        kept = [l for l in text.splitlines() if l not in mine]
        self._write_in_place(_HOSTS_PATH, "\n".join(kept) + ("\n" if kept else ""))
        self._hosts_lines = []
