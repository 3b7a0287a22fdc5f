"""LRC-BERT, the paper (Fu et al., AAAI 2021, arXiv 2012.07335), one idea per file; pure torch.

Each section of the method (../shared/METHOD.md, docs/METHOD_NOTES.md) and its file:

- Layer map phi(i) = i * N / M and the projections W_i (student -> teacher width):
  ``layer_map.py``.
- Angular distance g = 1 - cos, pooling (flatten/mean/cls), COS-NCE, the prediction-layer
  losses (soft t^2 KL, hard CE/MSE), the hidden-state MSE ablation, the alpha:beta:gamma
  weighting: ``losses.py``.
- Negatives from the other rows of the global batch (task stage): ``negatives.py``.
- The sharded FIFO memory bank of teacher negatives (general stage): ``bank.py``.
- Gradient perturbation on the student's embedding output, steps 1-4: ``perturb.py``.
- The loss schedule (the paper's two stages, 80% at 1:0:0 then 1:1:3, or 1:1:3 throughout,
  the task stage's default) and the lr schedule: ``schedule.py``.
- L_total of one pass, and the loss step of one micro-batch (the teacher once, negatives
  drawn once, the clean pass, the perturbation, the perturbed pass): ``objective.py``.

Nothing here imports deepspeed: these modules test on CPU in milliseconds. The runtime around
them (DeepSpeed engine, checkpoints, ranks, guards) is ``lrcbert.runtime``; data is ``lrcbert.data``.
"""
