"""Test hooks: environment variables that only tests/test_reliability.py sets, read here only.

Neither changes any number a run computes; they only change its timing.
- ``LRCBERT_PAUSE_BEFORE_RENAME=STEP``: rank 0 parks for good between a complete temporary
  checkpoint of that step and its rename, so a test can kill a run mid-save.
- ``LRCBERT_STEP_DELAY=SECONDS``: every rank sleeps after each optimizer step. Tiny test runs
  finish ten steps in under a second, faster than a test can watch for "past a checkpoint"
  and kill; nothing random or timed feeds the maths.
"""

from __future__ import annotations

import os
import sys
import time

PAUSE_BEFORE_RENAME_ENV = "LRCBERT_PAUSE_BEFORE_RENAME"
STEP_DELAY_ENV = "LRCBERT_STEP_DELAY"


def pause_before_rename(step: int, folder: str) -> None:
    pause = os.environ.get(PAUSE_BEFORE_RENAME_ENV)
    if pause is not None and int(pause) == step:
        print(f"{PAUSE_BEFORE_RENAME_ENV}: {folder} is complete; pausing before the rename",
              file=sys.stderr, flush=True)
        time.sleep(3600)


def step_delay() -> None:
    seconds = float(os.environ.get(STEP_DELAY_ENV) or 0)
    if seconds:
        time.sleep(seconds)
