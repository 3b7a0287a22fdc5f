"""``Run``: one training process's run state, created first in each recipe.

    def main(argv=None) -> int:
        with Run() as run:                      # from the first line: signals are caught
            args = parse_args(...)
            p = setup(args)                     # bad input -> "error: ..." and exit status 2
            train(run, args, p)                 # run.start(RunSettings.from_flags(args, steps)) first
        return run.exit_status

``Run`` owns rank, world, device, the output dir, the dead-rank watchdog and preemption; the
recipe keeps its loop written out and asks the run at each optimizer step whether to stop
(``should_stop``), when to checkpoint (``checkpoint_due``), and leaves through ``leave`` (a
stop: resumable) or ``finish`` (done). Leaving the ``with`` block turns how the run ended into
the exit status: 0 done or stopped and checkpointed; 2 a ``UserError``, printed once as
``error: ...``; 3 a collective failed because another rank died (named). Any other exception
propagates. The watchdog is stopped and the signal handlers restored on every path.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from lrcbert.errors import UserError
from lrcbert.files import write_json_atomic
from lrcbert.runtime import hooks
from lrcbert.runtime.checkpoints import seed_everything
from lrcbert.runtime.engine import Engine, init_distributed
from lrcbert.runtime.guards import (EXIT_PEER_DIED, EXIT_USER_ERROR, Preemption, Watchdog, dead_peer_after_failure,
                                    print_error)
from lrcbert.runtime.ranks import barrier, device, env_rank, env_world_size, is_main, rank_and_world


@dataclass(frozen=True)
class RunSettings:
    """What a run needs to know to start and stop."""

    output_dir: str
    total_steps: int
    save_steps: int  # checkpoint every N optimizer steps (0: only at the end and at an early stop)
    stop_after_steps: int  # checkpoint and stop after N steps without changing the schedule (<= 0: never)
    seed: int
    timeout_s: float  # --dist_timeout: collectives, and the watchdog's verdict on a silent peer
    fresh: bool  # empty the output dir first (--overwrite_output_dir without --resume)

    @classmethod
    def from_flags(cls, args, total_steps: int) -> "RunSettings":
        """From a recipe's flags: its ``output_dir``, ``save_steps``, ``resume`` and the shared run control."""
        return cls(args.output_dir, total_steps, args.save_steps, args.stop_after_steps, args.seed,
                   args.dist_timeout, args.overwrite_output_dir and not args.resume)


class Run:
    """Rank, world, device, output dir, watchdog and preemption of one training process."""

    def __init__(self):
        self.preemption = Preemption()
        self.watchdog: Watchdog | None = None
        self.exit_status = 0
        self.rank, self.world = env_rank(), env_world_size()  # from the launcher until start()
        self.device = device()
        self.settings: RunSettings | None = None
        self._preempted = False
        self._last_save = -1

    # ------------------------------------------------------------------ the with block

    def __enter__(self) -> "Run":
        self.preemption.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                return False
            if issubclass(exc_type, UserError):
                if is_main():
                    print_error(str(exc))
                self.exit_status = EXIT_USER_ERROR
                return True
            if issubclass(exc_type, Exception):  # a collective failed: name the dead rank if that is the cause
                message = dead_peer_after_failure(self.watchdog)
                if message is not None:
                    print_error(message)
                    self.exit_status = EXIT_PEER_DIED
                    return True
            return False
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            self.preemption.__exit__(exc_type, exc, tb)

    # ------------------------------------------------------------------ start

    def start(self, settings: RunSettings) -> None:
        """Collective: the process group, this rank's device, the output dir (emptied first when
        ``settings.fresh``), the watchdog, the seeds."""
        self.settings = settings
        init_distributed(settings.timeout_s)
        self.rank, self.world = rank_and_world()
        self.device = device()
        if self.is_main and settings.fresh and os.path.isdir(settings.output_dir):
            shutil.rmtree(settings.output_dir)
        barrier()
        if self.is_main:
            os.makedirs(settings.output_dir, exist_ok=True)
        self.watchdog = Watchdog.start_all(settings.output_dir, settings.timeout_s)
        seed_everything(settings.seed)

    @property
    def output_dir(self) -> str:
        return self.settings.output_dir

    @property
    def total_steps(self) -> int:
        return self.settings.total_steps

    def seed_dropout(self, seed: int) -> None:
        """Seed this rank's dropout apart from the others' (call once the engine holds the initial
        weights, which every rank built from the same seed): ranks that drew the same masks would
        train on correlated noise."""
        torch.manual_seed(seed + self.rank)

    @property
    def is_main(self) -> bool:
        return is_main()

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.output_dir, "checkpoints")

    def resume(self, engine: Engine, check=None) -> dict:
        """Load the newest checkpoint into ``engine``; returns its client state (see ``Engine.load``).
        ``check(state)`` may refuse the resume (UserError) before the run counts as resumed: the
        checkpoint and a preemption mark are then left as they were."""
        state = engine.load(self.checkpoint_dir)
        if check is not None:
            check(state)
        if self.is_main:
            Preemption.clear_mark(self.output_dir)  # the run has resumed: it is no longer a preempted one
        return state

    def save(self, engine: Engine, step: int, client_state: dict, keep_last: int,
             rank_state: dict | None = None) -> None:
        """An atomic checkpoint of ``engine`` under ``OUTPUT_DIR/checkpoints`` (see ``Engine.save``)."""
        engine.save(self.checkpoint_dir, step, client_state, keep_last, rank_state=rank_state)
        self._last_save = step

    # ------------------------------------------------------------------ each optimizer step

    def should_stop(self, done: int) -> bool:
        """After optimizer step ``done``, on every rank (one tiny all-reduce): stop early because a
        rank got SIGUSR1/SIGTERM or ``--stop_after_steps`` is reached. Never at the last step."""
        hooks.step_delay()
        self._preempted = self.preemption.agreed(self.device) and done < self.total_steps
        stop_after = 0 < self.settings.stop_after_steps <= done < self.total_steps
        return self._preempted or stop_after

    def checkpoint_due(self, done: int, stopping: bool) -> bool:
        """Every ``save_steps`` steps before the last, and at an early stop not already saved."""
        if done >= self.total_steps:
            return False
        every = self.settings.save_steps
        periodic = every > 0 and done % every == 0
        return periodic or (stopping and self._last_save != done)

    # ------------------------------------------------------------------ leaving

    def leave(self, done: int, *closing) -> None:
        """Leave a resumable run after its stop checkpoint: rank 0 marks a preemption
        (``OUTPUT_DIR/preempted``) and says how to continue; then ``finish(*closing)``."""
        for thing in closing:
            thing.close()
        if self.is_main:
            if self._preempted:
                Preemption.mark(self.output_dir, done, self.total_steps)
            print(f"{'preempted' if self._preempted else 'stopped'} after step {done} of {self.total_steps}; "
                  "continue with --resume")
        self.finish()

    def finish(self, *closing) -> None:
        """This rank is done: close ``closing`` (e.g. the monitor), stop watching the peers (they
        now leave at slightly different times), then wait for all of them."""
        for thing in closing:
            thing.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        barrier()

    def write_json(self, name: str, data: dict) -> None:
        """``OUTPUT_DIR/name`` from rank 0, atomically."""
        if self.is_main:
            write_json_atomic(os.path.join(self.output_dir, name), data, indent=2)

