"""The runtime around the method: DeepSpeed, ranks, checkpoints, guards, and the Run object.

- ``engine.py``: ``deepspeed.initialize``, the process group, backward/step, DeepSpeed's
  checkpoint files, precision support. The only module of the project that imports deepspeed.
- ``ds_config.py``: ds_config resolution; ``"auto"`` values filled from the flags,
  disagreements refused.
- ``checkpoints.py``: the checkpoint layout (``step-N/``, ``meta.json``, ``latest``), verify,
  prune, resume checks, RNG state.
- ``guards.py``: preemption signals, the dead-rank watchdog, the finite-loss check, exit statuses.
- ``ranks.py``: ranks from the launcher's environment, rank/world of the process group,
  device, barrier.
- ``hooks.py``: the test hooks (environment variables the reliability tests set), read in one place.
- ``run.py``: ``Run``, one process's run state, created first in each recipe.

Only ``engine.py`` (and ``run.py`` through it) touches deepspeed; importing this package
imports none of them.
"""
