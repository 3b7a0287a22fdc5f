"""Rank-0 progress bar and TensorBoard scalars, with loss terms averaged over ranks.

On a terminal the progress is a tqdm bar; written to a file (sbatch output, ``> log``) it is a
readable line every ``line_interval_s`` seconds and at the last step, instead of thousands of
carriage-return updates.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


OWN_SECTIONS = ("repr/",)


class Monitor:
    """Accumulates named scalars per micro-step and writes their means every ``log_steps``.

    All ranks call ``log``; the means are all-reduced (one small collective) so the
    curves describe the global batch. Only rank 0 owns the writer and the bar.
    """

    def __init__(self, log_dir: str | None, total_steps: int, initial_step: int, enabled: bool, desc: str,
                 line_interval_s: float = 30.0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.desc, self.total_steps, self.step = desc, total_steps, initial_step
        self.line_interval_s = line_interval_s
        self._line_start = (time.monotonic(), initial_step)
        self._last_line = time.monotonic()
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            # after a resume, TensorBoard drops what a killed run logged past the checkpoint
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=initial_step + 1 if initial_step else None)
            if sys.stderr.isatty():
                self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)
        self._samples = 0
        self._tokens = 0
        self._t0 = time.perf_counter()

    def accumulate(self, values: dict[str, torch.Tensor | float], samples: int = 0, tokens: int = 0) -> None:
        for name, value in values.items():
            self._sums[name] += float(value)
            self._counts[name] += 1
        self._samples += samples
        self._tokens += tokens

    def log(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        """Reduce, write and reset; returns the logged scalars (on every rank)."""
        names = sorted(self._sums)
        means = torch.tensor([self._sums[n] / max(self._counts[n], 1) for n in names] + [self._samples, self._tokens],
                             dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # every rank logs the same names at the same steps (same code path), so shapes agree
            dist.all_reduce(means)
            means[:-2] /= dist.get_world_size()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        # loss terms go under loss/; names that carry their own section (repr/...) keep it
        scalars = {(n if n.startswith(OWN_SECTIONS) else f"loss/{n}"): float(v)
                   for n, v in zip(names, means[:-2].tolist())}
        scalars["perf/samples_per_sec"] = float(means[-2]) / elapsed
        scalars["perf/tokens_per_sec"] = float(means[-1]) / elapsed
        scalars.update(extra)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        self._sums.clear()
        self._counts.clear()
        self._samples = self._tokens = 0
        self._t0 = time.perf_counter()
        return scalars

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        self.step += 1
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.enabled and (now - self._last_line >= self.line_interval_s or self.step == self.total_steps):
            self._last_line = now
            start, first = self._line_start
            rate = (self.step - first) / max(now - start, 1e-9)
            left = (self.total_steps - self.step) / rate if rate > 0 else float("inf")
            values = "".join(f", {k} {v:.4g}" for k, v in (postfix or {}).items())
            print(f"{self.desc}: step {self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.0f}%)"
                  f"{values}, {rate:.2f} steps/s, {left / 60:.1f} min left", file=sys.stderr, flush=True)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
