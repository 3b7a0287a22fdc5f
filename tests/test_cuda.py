"""What only a CUDA GPU can show (marker ``cuda``; each test skips where PyTorch sees no GPU).

``bash bench/gpu_check.sh --run`` runs them on the GPU machine (``pytest -m cuda``), with
the data and tokenizer from the GPU check's kit (``LRCBERT_DATA_DIR``, ``LRCBERT_TOKENIZER_DIR``).

- COS-NCE's maths (pooling, distances, the loss) on CUDA in bf16/fp16 matches the CPU's fp32;
- the memory bank on CUDA holds what a CPU bank holds after the same enqueues, and its
  negative distance sums equal the CPU's over the slots it drew;
- general distillation (pretrain/general_distill.py, the real engine: DeepSpeed ZeRO-2 over
  NCCL, one rank) runs on the GPU in bf16 and in fp16 (dynamic loss scale) with bank
  negatives and gradient perturbation, logs finite losses, reports its peak GPU memory and
  exports a student that loads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lrcbert.method import losses
from lrcbert.method.bank import MemoryBank
from tests.helpers import REPO, SHARED_DATA, free_port, make_tiny_encoder, make_wiki_corpus, scalar_curves, tokenizer_dir

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none)")]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
GPU = "cuda"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cos_nce_on_cuda_matches_cpu(precision):
    """Flatten-pooled (B, 128, 768) half-precision states: the loss on the GPU equals the CPU's
    (fp32 maths on both, from the same half-precision inputs)."""
    gen = torch.Generator().manual_seed(0)
    b, t, d, k = 8, 128, 768, 7
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, 100:] = 0  # padded rows: zero in the flattened vector
    student = (3 * torch.randn(b, t, d, generator=gen)).to(HALF[precision])
    teacher = (3 * torch.randn(b, t, d, generator=gen)).to(HALF[precision])
    negatives = (3 * torch.randn(b, k, t * d, generator=gen)).to(HALF[precision])

    def loss(device):
        z_s = losses.pool(student.to(device), mask.to(device))
        z_t = losses.pool(teacher.to(device), mask.to(device))
        pos = losses.angular_distance(z_t, z_s)
        neg = losses.angular_distance(negatives.to(device), z_s.unsqueeze(1)).sum(1)
        pair = losses.pairwise_angular_distance(z_s, z_t)
        return losses.cos_nce(pos, neg, k), pair

    cpu_loss, cpu_pair = loss("cpu")
    gpu_loss, gpu_pair = loss(GPU)
    assert gpu_loss.device.type == GPU and gpu_loss.dtype == torch.float32
    assert math.isfinite(float(gpu_loss))
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu_pair.cpu(), cpu_pair, rtol=1e-4, atol=1e-4)


def test_bank_negatives_on_cuda_match_cpu():
    """A CUDA bank (its draws come from a CUDA generator) after the same enqueues as a CPU bank:
    the same contents, and its distance sums equal the CPU's fp64 sums over the slots it drew."""
    layers, size, dim, batch, k = 2, 64, 128 * 64, 8, 7
    devices = {"cpu": "cpu", "gpu": GPU}
    banks = {name: MemoryBank(layers, size, dim, dtype=torch.float16, device=dev, groups=4, seed=0)
             for name, dev in devices.items()}
    gen = torch.Generator().manual_seed(1)
    for step in range(size // batch):
        vectors = [torch.randn(batch, dim, generator=gen) for _ in range(layers)]
        ids = torch.arange(batch) + step * batch
        for name, bank in banks.items():
            bank.enqueue([v.to(devices[name]) for v in vectors], ids.to(devices[name]))
    contents = {name: bank.global_contents() for name, bank in banks.items()}
    assert torch.equal(contents["gpu"][0].cpu(), contents["cpu"][0])
    assert torch.equal(contents["gpu"][1].cpu(), contents["cpu"][1])

    bank = banks["gpu"]
    student = [torch.randn(batch, dim, generator=gen) for _ in range(layers)]
    positives = torch.arange(batch) + 10_000
    slots = bank.sample_slots(positives.to(GPU), k, bank.make_generator(3)).cpu()  # what draw() samples
    got, got_k = bank.draw(positives.to(GPU), k, bank.make_generator(3))([z.to(GPU) for z in student])
    assert got_k == k and got[0].device.type == GPU
    vectors = contents["cpu"][0]
    for layer, z in enumerate(student):
        expected = torch.stack([(1 - F.cosine_similarity(vectors[layer, slots[i]].double(), z[i].double()[None],
                                                         dim=-1, eps=1e-6)).sum() for i in range(batch)])
        torch.testing.assert_close(got[layer].double().cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_general")
    teacher = make_tiny_encoder(root / "teacher", layers=4, hidden=128, tokenizer=tokenizer_dir())
    corpus = make_wiki_corpus(root, 300, 64, teacher)
    return teacher, corpus


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_general_distillation_runs_on_cuda(precision, tiny_setup, tmp_path):
    teacher, corpus = tiny_setup
    assert (SHARED_DATA / "wikitext-2" / "wiki.test.raw").is_file()
    out = tmp_path / "run"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    args = ["--ds_config", "ds_configs/z2.json", "--teacher", teacher, "--corpus", str(corpus),
            "--output_dir", str(out), "--precision", precision, "--max_seq_length", "64",
            "--micro_batch_size", "16", "--max_steps", "12", "--log_steps", "1", "--save_steps", "0",
            "--negatives", "bank", "--bank_size", "128", "--bank_groups", "4", "--num_negatives", "7",
            "--student_layers", "2", "--student_hidden", "64", "--student_intermediate", "128",
            "--student_heads", "4", "--learning_rate", "1e-3", "--warmup", "2"]
    proc = subprocess.run([sys.executable, "pretrain/general_distill.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12
    assert summary.get("peak_gpu_memory_allocated_bytes", 0) > 0 or GPU == "cpu"
    curves = scalar_curves(out / "tensorboard")
    cos = curves["loss/cos"]
    assert len(cos) == 12 and all(math.isfinite(v) for v in cos.values())
    assert max(curves["bank/in_use"].values()) == 1.0, "the bank took over from batch negatives"
    if precision == "fp16":
        assert all(v >= 1.0 for v in curves["train/loss_scale"].values())
    from transformers import AutoModel

    student = AutoModel.from_pretrained(out / "model")
    assert student.config.num_hidden_layers == 2
    assert all(torch.isfinite(p).all() for p in student.parameters())
