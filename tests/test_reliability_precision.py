"""Mixed-precision safety: fp32 maths on half inputs, and an overflowed step is skipped, never applied.

The overflow tests run a real DeepSpeed ZeRO-2 engine (one rank, gloo) in a subprocess and
force inf gradients into steps. DeepSpeed's CPU accelerator reports fp16 as unsupported unless
the CPU has AVX512-FP16 (a speed matter: torch's CPU fp16 kernels are correct, only slow), so on
such a CPU the subprocess lifts that capability check for this tiny model and runs DeepSpeed's
real fp16 path: its dynamic loss scaler, its overflow check and the ZeRO-2 step skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lrcbert.method import losses
from lrcbert.method.perturb import perturbation_delta
from tests.helpers import REPO, free_port

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF)
def test_losses_take_half_inputs_and_compute_in_fp32(dtype):
    # a flattened 64 x 512 state of magnitude 40: squared norms far past fp16's 65504
    big = torch.full((3, 64 * 512), 40.0, dtype=dtype)
    other = big.clone()
    other[1] = -other[1]
    mask = torch.ones(3, 64, dtype=torch.long)
    pooled = losses.pool(big.view(3, 64, 512), mask, "flatten")
    assert pooled.dtype == torch.float32
    for value, expected in ((losses.cosine(big, other), [1.0, -1.0, 1.0]),
                            (losses.pairwise_angular_distance(big, other)[:, 0], [0.0, 0.0, 0.0])):
        assert value.dtype == torch.float32 and torch.allclose(value, torch.tensor(expected), atol=1e-5)
    logits = torch.tensor([[300.0, -300.0], [0.0, 1.0]], dtype=dtype)
    for value in (losses.soft_loss(logits, logits.flip(-1)), losses.hard_loss(logits, torch.tensor([1, 0])),
                  losses.hidden_mse(big.view(3, 64, 512), -big.view(3, 64, 512), mask),
                  losses.cos_nce(torch.zeros(3, dtype=dtype), torch.full((3,), 30.0, dtype=dtype), 15)):
        assert value.dtype == torch.float32 and torch.isfinite(value), value


@pytest.mark.parametrize("dtype", HALF)
def test_perturbation_direction_is_computed_in_fp32(dtype):
    # dL/de = w: every element fits the half type, its per-sample norm (~1e5) does not fit fp16
    w = torch.full((2, 64, 32), 1000.0, dtype=dtype)
    e = torch.randn(2, 64, 32).to(dtype).requires_grad_()
    loss = (e * w).sum()
    delta = perturbation_delta(loss, e, epsilon=2.0)
    assert delta is not None and delta.dtype == dtype
    norms = delta.float().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((2,), 2.0), rtol=1e-2), norms  # epsilon, per sample
    # a gradient that itself overflowed gives no direction (the caller trains on the clean pass)
    e2 = torch.randn(2, 4, dtype=torch.float16, requires_grad=True)
    assert perturbation_delta((e2 * torch.tensor(float("inf"), dtype=torch.float16)).sum(), e2, 1.0) is None


OVERFLOW_SCRIPT = r"""
import json, sys
import torch
from lrcbert.runtime import ds_config
from lrcbert.runtime import engine as eng

precision = sys.argv[1]
if precision == "fp16":
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if not acc.is_fp16_supported():  # CPU without AVX512-FP16: slow kernels, same maths
        acc.is_fp16_supported = lambda: True
        acc.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
eng.init_distributed(120)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
config = ds_config.resolve_ds_config("ds_configs/z2.json", ds_config.TrainerSettings(4, 1, 1, 1.0, precision))
engine = eng.Engine(model, eng.build_optimizer(model, 1e-2, 0.0), lambda step: 1.0, config)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
x = torch.randn(4, 16).to(dtype)

def weights():
    return [p.detach().float().clone() for p in engine.module.parameters()]

def step(force_inf):
    loss = engine(x).float().pow(2).mean()  # finite: only the gradient overflows, as in fp16 training
    handle = None
    if force_inf:  # what an fp16 overflow leaves in a gradient
        handle = engine.module[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    engine.backward(loss)
    engine.step()
    if handle is not None:
        handle.remove()

step(False)
before, scale_before = weights(), engine.loss_scale
# two overflowing steps in a row: the ds_configs use hysteresis 2, so the scale drops on the second
scales = []
for _ in range(2):
    step(True)
    scales.append(engine.loss_scale)
after, scale_after = weights(), engine.loss_scale
skipped = engine.skipped_steps
step(False)
moved = weights()
print(json.dumps({
    "skipped": skipped, "scale_before": scale_before, "scale_after": scale_after, "scales": scales,
    "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
    "finite": all(bool(torch.isfinite(w).all()) for w in after + moved),
    "moved_after": any(not torch.equal(a, b) for a, b in zip(after, moved)),
    "skipped_final": engine.skipped_steps}))
"""


def run_one_rank_engine(script: str, precision: str) -> dict:
    """Run ``script`` as a one-rank gloo DeepSpeed job in a subprocess; its last stdout line (JSON)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, precision], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_an_overflowed_step_is_skipped_and_never_reaches_the_weights(precision):
    result = run_one_rank_engine(OVERFLOW_SCRIPT, precision)
    assert result["skipped"] == 2 and result["skipped_final"] == 2, result
    assert result["unchanged"] and result["finite"] and result["moved_after"], result
    if precision == "fp16":  # the dynamic loss scale: kept on the first overflow (hysteresis 2), halved on the second
        assert result["scales"] == [result["scale_before"], result["scale_before"] / 2], result


CARRY_SCRIPT = r"""
import json, sys
import torch
from transformers import BertConfig, BertForSequenceClassification
from lrcbert.method.perturb import perturbed_loss
from lrcbert.models import DistillStudent
from lrcbert.runtime import ds_config
from lrcbert.runtime import engine as eng

precision = sys.argv[1]
if precision == "fp16":
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True
        acc.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
eng.init_distributed(120)
ids = torch.randint(1, 50, (4, 7), generator=torch.Generator().manual_seed(1))
mask = torch.ones_like(ids)
mask[0, 5:] = 0


def run(mode, carry, accumulation):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    module = DistillStudent(BertForSequenceClassification(cfg), [1, 2], teacher_width=24)
    config = ds_config.resolve_ds_config("ds_configs/z2.json", ds_config.TrainerSettings(
        4 // accumulation, accumulation, 1, 1.0, precision))
    engine = eng.Engine(module, eng.build_optimizer(module, 1e-3, 0.0), lambda step: 1.0, config)
    start = [p.detach().float().clone() for p in engine.module.parameters()]
    torch.manual_seed(2)
    for _ in range(3):
        for part in range(accumulation):
            rows = slice(part * 4 // accumulation, (part + 1) * 4 // accumulation)

            def loss_of(forward, delta=None):
                logits, _, embeddings, _ = forward(ids[rows], mask[rows], None, delta)
                loss = logits.float().pow(2).mean()
                return loss, {}, embeddings

            loss, _ = perturbed_loss(loss_of, engine, engine.module, 0.05, engine.loss_scale, mode,
                                     attention_mask=mask[rows], relative=True,
                                     params=engine.whole_parameters if carry else None)
            engine.backward(loss)
            engine.step()
    end = [p.detach().float().clone() for p in engine.module.parameters()]
    moved = torch.cat([(b - a).flatten() for a, b in zip(start, end)])
    return end, moved, engine.skipped_steps


out = {}
for accumulation in (1, 2):
    ref, moved, skipped = run("add", False, accumulation)
    for name, (mode, carry) in {"carry": ("add", True), "replace": ("replace", True)}.items():
        end, _, sk = run(mode, carry, accumulation)
        diff = torch.cat([(b - a).flatten() for a, b in zip(ref, end)])
        out[f"{name}_gas{accumulation}"] = {"rel_diff": float(diff.abs().mean() / moved.abs().mean()),
                                            "skipped": [skipped, sk]}
print(json.dumps(out))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_add_mode_carried_gradients_train_as_both_graphs_under_zero2(precision):
    """A real DeepSpeed ZeRO-2 engine (one rank, gloo), three optimizer steps, with and without
    gradient accumulation: add mode with the clean gradients carried into the engine's backward
    (two backward passes) moves the weights as backpropagating both graphs does (three), through
    the loss scaling and accumulation of each precision; replace mode, for scale, moves them
    differently by about a tenth of the update."""
    result = run_one_rank_engine(CARRY_SCRIPT, precision)
    for accumulation in (1, 2):
        carried, replace = result[f"carry_gas{accumulation}"], result[f"replace_gas{accumulation}"]
        assert carried["rel_diff"] < 1e-3 and carried["skipped"] == [0, 0], result
        assert replace["rel_diff"] > 0.05, result
