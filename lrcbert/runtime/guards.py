"""Run guards: preemption signals, the dead-rank watchdog, the finite-loss check, exit statuses.

No deepspeed import. ``Run`` (run.py) wires them into a recipe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist

from lrcbert.errors import UserError
from lrcbert.files import write_atomic
from lrcbert.runtime.ranks import barrier, rank_and_world

PREEMPTED = "preempted"  # marker file in OUTPUT_DIR: the run stopped on a signal and can be resumed
EXIT_USER_ERROR = 2  # exit status of a run refused for bad input (one line "error: ...")
EXIT_PEER_DIED = 3  # exit status of a rank that stops because another rank died


class Preemption:
    """SIGUSR1/SIGTERM only set a flag; the loop checkpoints and stops at the next step boundary.

    Entered first thing in a recipe's ``main`` so that a signal during start-up (reading data,
    loading models) is not fatal: the run checkpoints after its first step. Leaving the block
    restores the previous handlers.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "Preemption":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.requested = True

    @staticmethod
    def mark(output_dir: str, done: int, total: int) -> None:
        """Leave ``OUTPUT_DIR/preempted`` (rank 0): the run stopped on a signal and can be resumed."""
        with open(os.path.join(output_dir, PREEMPTED), "w") as f:
            f.write(f"step {done} of {total}: continue with --resume\n")

    @staticmethod
    def clear_mark(output_dir: str) -> None:
        """Remove the marker once a run has resumed (rank 0)."""
        path = os.path.join(output_dir, PREEMPTED)
        if os.path.exists(path):
            os.remove(path)

    def agreed(self, device) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if rank_and_world()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Watchdog:
    """Notices a dead rank, so that the others stop instead of waiting in a collective.

    Every rank keeps a heartbeat file ``OUTPUT_DIR/.ranks/rankNNNNN.json`` (pid, host, state)
    and touches it every ``interval_s``; a thread checks the peers. A peer is dead when it is
    on this host and its process is gone (seen within ``interval_s``), or when its heartbeat
    has not changed for ``timeout_s`` (another host; ``--dist_timeout``). Then this rank prints
    ``error: rank R ... died`` and exits with ``EXIT_PEER_DIED`` (``os._exit``: the main thread
    may be blocked in a collective). A rank that leaves on purpose marks its file ``exited``.
    Costs one stat per peer per interval; the files need the shared output dir checkpoints
    already need.
    """

    def __init__(self, output_dir: str, rank: int, world: int, timeout_s: float, interval_s: float = 1.0):
        self.folder = os.path.join(output_dir, ".ranks")
        self.rank, self.world = rank, world
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._thread = None
        self._seen: dict[int, tuple[float, float]] = {}  # rank -> (file mtime, local time it last changed)
        os.makedirs(self.folder, exist_ok=True)
        self._write("running")

    def _path(self, rank: int) -> str:
        return os.path.join(self.folder, f"rank{rank:05d}.json")

    def _write(self, state: str) -> None:
        write_atomic(self._path(self.rank), json.dumps({"pid": os.getpid(), "host": self.host, "state": state}),
                     sync=False)

    @classmethod
    def start_all(cls, output_dir: str, timeout_s: float) -> "Watchdog":
        """Collective: every rank's watchdog, started once all heartbeat files exist.
        ``output_dir`` must exist (or be created by rank 0) when any rank calls this."""
        barrier()  # rank 0 may just have created output_dir
        watchdog = cls(output_dir, *rank_and_world(), timeout_s)
        barrier()
        return watchdog.start()

    def start(self) -> "Watchdog":
        """Call after a barrier that follows every rank's construction (all files exist)."""
        if self.world > 1:
            self._thread = threading.Thread(target=self._run, name="lrcbert-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """This rank leaves on purpose: stop watching, tell the peers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._write("exited")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                os.utime(self._path(self.rank))
                message = self.dead_peer()
            except OSError:
                continue  # a transient file-system error is no verdict
            if message and not self._stop.is_set():
                print_error(message)
                os._exit(EXIT_PEER_DIED)

    def dead_peer(self) -> str | None:
        """A one-line verdict on the first dead peer, or None."""
        now = time.monotonic()
        for peer in range(self.world):
            if peer == self.rank:
                continue
            path = self._path(peer)
            try:
                with open(path) as f:
                    info = json.load(f)
                mtime = os.stat(path).st_mtime
            except (OSError, ValueError):
                continue  # being replaced right now
            if info.get("state") == "exited":
                continue
            who = f"rank {peer} (pid {info['pid']} on {info['host']})"
            if info["host"] == self.host and not _process_alive(info["pid"]):
                return f"{who} died; stopping rank {self.rank} too (continue with --resume)"
            last_mtime, changed = self._seen.get(peer, (mtime, now))
            if mtime != last_mtime:
                changed = now
            self._seen[peer] = (mtime, changed)
            if now - changed > self.timeout_s:
                return (f"{who} stopped responding: no heartbeat for {now - changed:.0f} s (--dist_timeout "
                        f"{self.timeout_s:g}); stopping rank {self.rank} too (continue with --resume)")
        return None


def _process_alive(pid: int) -> bool:
    """False for a process that is gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def print_error(message: str) -> None:
    """``error: <message>`` on stderr, on a line of its own even below a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)
    sys.stderr.flush()


def dead_peer_after_failure(watchdog: Watchdog | None, wait_s: float = 5.0) -> str | None:
    """After a collective failed: the dead peer that explains it (polled for ``wait_s``), or None."""
    if watchdog is None or watchdog.world == 1:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        message = watchdog.dead_peer()
        if message or time.monotonic() > deadline:
            return message
        time.sleep(0.2)



def check_finite_loss(loss: torch.Tensor, step: int, micro_step: int, example_ids: Callable[[], list],
                      what: str = "examples") -> None:
    """UserError on every rank if any rank's loss is NaN/inf, naming the step, the rank and the
    examples of its micro-batch (so bad data can be found); one tiny all-reduce per micro-step.

    ``example_ids`` is a callable returning the micro-batch's ids: it runs only on a rank whose
    loss is bad, so the hot path moves no ids from the device."""
    bad = torch.isfinite(loss.detach()).all().logical_not().float().reshape(1)  # on the device: no sync yet
    world = rank_and_world()[1]
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if not bad.item():
        return
    mine = None if torch.isfinite(loss.detach()).all() else (float(loss.detach().float()), list(example_ids()))
    reports = [mine]
    if world > 1:
        reports = [None] * world
        dist.all_gather_object(reports, mine)
    rank, (value, ids) = next((r, rep) for r, rep in enumerate(reports) if rep is not None)
    raise UserError(f"loss is {value} at step {step + 1} (micro-step {micro_step + 1}) on rank {rank}; "
                    f"its micro-batch holds {what} {ids}: check them for bad values")
