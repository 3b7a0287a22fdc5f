"""Memory bank: FIFO/shard layout, sampling, distance sums, dtypes, state, reshard, launcher run."""

import importlib.util
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from lrcbert.method.bank import MemoryBank
from lrcbert.errors import UserError
from tests.helpers import REPO, launch

SCRIPT = REPO / "tests" / "dist_scripts" / "bank_equivalence.py"


def filled_bank(size=8, dim=5, layers=2, batches=3, batch=3, dtype=torch.float32, seed=0):
    """A bank after ``batches`` enqueues of ``batch`` rows; ids count up from 0."""
    bank = MemoryBank(layers, size, dim, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(batches):
        bank.enqueue([torch.randn(batch, dim, generator=gen) for _ in range(layers)],
                     torch.arange(batch) + step * batch)
    return bank


def brute_force_sums(bank, z, slots):
    """Per layer (B,) sums of 1 - cos over the given global slots, one pair at a time, fp64."""
    vectors, _ = bank.global_contents()
    out = []
    for layer, zl in enumerate(z):
        rows = []
        for i in range(zl.shape[0]):
            negs = vectors[layer, slots[i]].double()
            rows.append((1 - F.cosine_similarity(negs, zl[i].double()[None], dim=-1, eps=1e-6)).sum())
        out.append(torch.stack(rows))
    return out


# --------------------------------------------------------------------------- layout and FIFO

def test_enqueue_fifo_wraps_with_exact_slot_contents():
    bank = MemoryBank(2, 5, 3, dtype=torch.float32)
    row = lambda i, layer: torch.full((3,), 10.0 * layer + i)  # noqa: E731
    for start in (0, 2, 4):  # 6 rows into 5 slots: row 5 overwrites slot 0
        ids = torch.arange(start, start + 2)
        bank.enqueue([torch.stack([row(int(i), layer) for i in ids]) for layer in range(2)], ids)
    assert bank.ids.tolist() == [5, 1, 2, 3, 4]
    assert int(bank.write_ptr) == 1 and int(bank.fill) == 5
    for layer in range(2):
        assert bank.vectors[layer, :, 0].tolist() == [10.0 * layer + i for i in (5, 1, 2, 3, 4)]


def test_fill_count_grows_then_caps():
    bank = MemoryBank(1, 6, 2)
    fills = []
    for step in range(4):
        bank.enqueue([torch.ones(4, 2)], torch.arange(4) + 4 * step)
        fills.append(int(bank.fill))
    assert fills == [4, 6, 6, 6]
    assert int(bank.write_ptr) == 16 % 6


def test_bytes_per_rank_halves_with_two_ranks():
    one = MemoryBank(4, 4096, 128 * 768, device="meta")
    two = MemoryBank(4, 4096, 128 * 768, rank=1, world_size=2, device="meta")
    ids_and_counters = 4096 * 8 + 4 * 8 + 2 * 8
    assert one.bytes_per_rank() == 4 * 4096 * 128 * 768 * 2 + ids_and_counters
    assert two.bytes_per_rank() == 4 * 2048 * 128 * 768 * 2 + ids_and_counters


# --------------------------------------------------------------------------- sampling

def test_sampling_excludes_own_id_and_never_repeats():
    bank = MemoryBank(1, 10, 2)
    for step in range(3):  # ids mod 7 repeat, as in a later epoch: 0, 5 and 6 sit in two slots
        bank.enqueue([torch.randn(5, 2)], (torch.arange(5) + 5 * step) % 7)
    positive_ids = torch.tensor([0, 3, 6, 9])
    seen = set()
    for step in range(50):
        slots = bank.sample_slots(positive_ids, 6, bank.make_generator(step))
        assert slots.shape == (4, 6)
        for i, row in enumerate(slots.tolist()):
            assert len(set(row)) == 6
            assert all(int(bank.ids[s]) != int(positive_ids[i]) for s in row)
            seen.update((i, s) for s in row)
    for i, pid in enumerate(positive_ids.tolist()):  # every allowed slot is drawn sometimes
        assert {s for r, s in seen if r == i} == {s for s in range(10) if int(bank.ids[s]) != pid}


def test_sampling_is_reproducible_and_advances_the_step():
    bank = filled_bank()
    ids = torch.tensor([1, 20])
    first = bank.sample_slots(ids, 4)
    assert int(bank.sample_step) == 1
    assert torch.equal(first, bank.sample_slots(ids, 4, bank.make_generator(0)))
    assert not torch.equal(first, bank.sample_slots(ids, 4))


# --------------------------------------------------------------------------- distance sums

def test_distance_sums_by_hand():
    bank = MemoryBank(1, 3, 2, dtype=torch.float32)
    bank.enqueue([torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])], torch.tensor([0, 1, 2]))
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    sums, k = bank.negative_distance_sums([z], torch.tensor([7, 2]), 2)
    # row 0 (id 7): 2 of {g=0, 1, 2}; row 1 (id 2 is excluded): slots 0 and 1, g = 2 * (1 - 1/sqrt 2)
    slots = bank.sample_slots(torch.tensor([7, 2]), 2, bank.make_generator(0))
    expect0 = sum({0: 0.0, 1: 1.0, 2: 2.0}[s] for s in slots[0].tolist())
    assert k == 2
    assert sums[0].tolist() == pytest.approx([expect0, 2 - 2 ** 0.5], abs=1e-6)


def test_distance_sums_match_brute_force_values_and_gradients():
    bank = filled_bank(size=12, dim=7, batches=5)  # wrapped; ids 3..14 in the bank
    z = [torch.randn(4, 7, requires_grad=True) for _ in range(2)]
    ids = torch.tensor([3, 9, 14, 100])
    sums, _ = bank.negative_distance_sums(z, ids, 5, bank.make_generator(3))
    slots = bank.sample_slots(ids, 5, bank.make_generator(3))
    z_ref = [t.detach().clone().requires_grad_(True) for t in z]
    ref = brute_force_sums(bank, z_ref, slots)
    for got, want in zip(sums, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    weights = torch.randn(2, 4)
    (torch.stack(sums) * weights).sum().backward()
    (torch.stack(ref) * weights.double()).sum().backward()
    for got, want in zip(z, z_ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage_uses_fp32_maths(dtype):
    bank = MemoryBank(1, 4, 1024, dtype=dtype)
    teacher = torch.randn(4, 1024) * 300  # squared norms overflow fp16; values themselves fit
    bank.enqueue([teacher], torch.arange(4))
    assert bank.vectors.dtype == dtype
    torch.testing.assert_close(bank.vectors[0].float(), teacher.to(dtype).float())
    z = torch.randn(2, 1024, requires_grad=True)
    sums, _ = bank.negative_distance_sums([z], torch.tensor([10, 11]), 3, bank.make_generator(0))
    assert sums[0].dtype == torch.float32 and torch.isfinite(sums[0]).all()
    slots = bank.sample_slots(torch.tensor([10, 11]), 3, bank.make_generator(0))
    torch.testing.assert_close(sums[0].double(), brute_force_sums(bank, [z.detach()], slots)[0],
                               rtol=1e-5, atol=1e-5)


def test_all_zero_vectors_give_finite_sums_and_gradients():
    bank = MemoryBank(1, 4, 6)
    bank.enqueue([torch.zeros(4, 6)], torch.arange(4))
    z = torch.zeros(3, 6, requires_grad=True)
    sums, _ = bank.negative_distance_sums([z], torch.tensor([7, 8, 9]), 2)
    assert sums[0].tolist() == [2.0, 2.0, 2.0]  # cosine 0 with everything: g = 1 per negative
    sums[0].sum().backward()
    assert torch.isfinite(z.grad).all()


def test_chunked_scoring_matches_unchunked():
    bank = filled_bank(size=12, dim=7, batches=4)
    z = [torch.randn(3, 7) for _ in range(2)]
    ids = torch.tensor([0, 5, 50])
    whole, _ = bank.negative_distance_sums(z, ids, 8, bank.make_generator(1))
    bank.chunk_bytes = 4 * 7 * 3  # three slots per chunk
    chunked, _ = bank.negative_distance_sums(z, ids, 8, bank.make_generator(1))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)


def test_one_draw_scores_both_passes_and_a_changed_bank_needs_a_new_draw(monkeypatch):
    # the clean and the perturbed pass of one step score against one draw: the second pass
    # must give the same sums and gradients without summing the bank's rows again
    bank = filled_bank(size=12, dim=7, batches=4)
    ids = torch.tensor([0, 5, 50])
    z = [torch.randn(3, 7, requires_grad=True) for _ in range(2)]
    calls = []
    real = bank._direction_sums
    monkeypatch.setattr(bank, "_direction_sums", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def score(negatives):
        sums, _ = negatives(z)
        grads = torch.autograd.grad(torch.stack(sums).sum(), z)
        return [s.detach() for s in sums], grads

    gen = bank.make_generator(2)
    negatives = bank.draw(ids, 6, gen)
    assert len(calls) == 2  # one per layer, at the draw
    first, second = score(negatives), score(negatives)
    assert len(calls) == 2  # passes do not touch the bank's rows
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)
    fresh = score(bank.draw(ids, 6, bank.make_generator(2)))  # the same draw made again: the same numbers
    for a, b in zip(first[0] + list(first[1]), fresh[0] + list(fresh[1])):
        assert torch.equal(a, b)
    bank.enqueue([torch.randn(3, 7) for _ in range(2)], torch.arange(3) + 60)
    slots = bank.sample_slots(ids, 6, bank.make_generator(3))
    for got, want in zip(score(bank.draw(ids, 6, bank.make_generator(3)))[0],
                         brute_force_sums(bank, [t.detach() for t in z], slots)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="drawn for 3 rows"):
        negatives([t[:2] for t in z])


def test_narrower_vectors_are_zero_padded_to_the_bank_width():
    # flatten pooling of a batch padded to fewer tokens: the bank pads, no cosine changes
    bank = filled_bank(size=8, dim=5, batches=2)
    narrow = [torch.randn(2, 3) for _ in range(2)]
    wide = [torch.nn.functional.pad(v, (0, 2)) for v in narrow]
    a, _ = bank.negative_distance_sums(narrow, torch.tensor([40, 41]), 3, bank.make_generator(0))
    b, _ = bank.negative_distance_sums(wide, torch.tensor([40, 41]), 3, bank.make_generator(0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    bank.enqueue(narrow, torch.tensor([50, 51]))
    vectors, _ = bank.global_contents()
    assert torch.equal(vectors[0, 6], wide[0][0]) and torch.equal(vectors[1, 7], wide[1][1])


def test_held_vectors_join_the_bank_at_flush():
    bank = filled_bank(size=8, dim=5, batches=1)
    before = int(bank.fill)
    bank.hold([torch.randn(2, 5) for _ in range(2)], torch.tensor([70, 71]))
    bank.hold([torch.randn(2, 4) for _ in range(2)], torch.tensor([72, 73]))
    assert int(bank.fill) == before  # held, not yet enqueued
    bank.flush()
    assert int(bank.fill) == before + 4 and bank.ids[before: before + 4].tolist() == [70, 71, 72, 73]
    bank.flush()  # nothing left
    assert int(bank.fill) == before + 4


# --------------------------------------------------------------------------- state and reshard

def test_state_round_trip_continues_identically():
    bank = filled_bank(size=8, batches=3)
    bank.sample_slots(torch.tensor([0]), 2)  # advance the sampling stream
    copy = MemoryBank(2, 8, 5, dtype=torch.float32)
    copy.load_state_dict(bank.state_dict())
    for name, buf in bank.named_buffers():
        assert torch.equal(buf, dict(copy.named_buffers())[name]), name
    z, ids = [torch.randn(2, 5) for _ in range(2)], torch.tensor([1, 2])
    for b in (bank, copy):
        b.enqueue([torch.ones(3, 5), -torch.ones(3, 5)], torch.tensor([30, 31, 32]))
    a_sums, _ = bank.negative_distance_sums(z, ids, 4)
    b_sums, _ = copy.negative_distance_sums(z, ids, 4)
    for a, b in zip(a_sums, b_sums):
        assert torch.equal(a, b)


def test_reshard_preserves_global_contents_and_order():
    bank = filled_bank(size=8, batches=3, dtype=torch.float16)  # wrapped: write_ptr 1
    one = [bank.state_dict()]
    two = MemoryBank.reshard(one, 2)
    assert [s["shard"].tolist() for s in two] == [[0, 2], [1, 2]]
    assert torch.equal(two[1]["vectors"], bank.vectors[:, 1::2])  # strided ownership
    four = MemoryBank.reshard(two, 4)
    for shards in (MemoryBank.reshard(two, 1), MemoryBank.reshard(four, 1), MemoryBank.reshard(four, 2)):
        back = MemoryBank.reshard(shards, 1)[0]
        for key, value in one[0].items():
            assert torch.equal(back[key], value), key
    shard = MemoryBank(2, 8, 5, rank=3, world_size=4, dtype=torch.float16)
    shard.load_state_dict(four[3])  # per-shard load needs no process group
    assert torch.equal(shard.vectors, bank.vectors[:, 3::4])
    assert int(shard.write_ptr) == int(bank.write_ptr) and int(shard.fill) == 8


def test_loading_a_shard_of_another_world_is_a_user_error():
    two = MemoryBank.reshard([filled_bank().state_dict()], 2)
    with pytest.raises(UserError, match="reshard"):
        MemoryBank(2, 8, 5, dtype=torch.float32).load_state_dict(two[0])
    with pytest.raises(UserError, match="shape"):
        MemoryBank(2, 8, 6, dtype=torch.float32).load_state_dict(filled_bank().state_dict())
    with pytest.raises(UserError, match="divisible"):
        MemoryBank.reshard(two, 3)
    with pytest.raises(UserError, match="labelled"):
        MemoryBank.reshard(two[::-1], 1)


# --------------------------------------------------------------------------- user errors

def test_user_errors():
    with pytest.raises(UserError, match="divisible"):
        MemoryBank(1, 10, 4, rank=0, world_size=4)
    bank = filled_bank(size=8, batches=1)  # 3 filled slots
    with pytest.raises(UserError, match="holds only 3"):
        bank.negative_distance_sums([torch.randn(1, 5)] * 2, torch.tensor([50]), 4)
    with pytest.raises(UserError, match="fewer than k=3"):  # id 1 is in the bank: 2 negatives left
        bank.negative_distance_sums([torch.randn(1, 5)] * 2, torch.tensor([1]), 3)
    with pytest.raises(UserError, match="larger than the number of negatives"):
        bank.validate(8, 4)
    with pytest.raises(UserError, match="global batch size"):
        bank.validate(4, 16)
    bank.validate(4, 8)
    with pytest.raises(UserError, match="does not fit"):
        bank.enqueue([torch.randn(9, 5)] * 2, torch.arange(9))
    with pytest.raises(UserError, match="2 layers"):
        bank.enqueue([torch.randn(2, 5)], torch.arange(2))
    with pytest.raises(UserError, match="non-negative"):
        bank.enqueue([torch.randn(2, 5)] * 2, torch.tensor([0, -1]))
    with pytest.raises(UserError, match=r"at most 5"):  # narrower vectors are zero-padded, wider ones refused
        bank.enqueue([torch.randn(2, 6)] * 2, torch.arange(2))


# --------------------------------------------------------------------------- two ranks, real launcher

def _load_script():
    spec = importlib.util.spec_from_file_location("bank_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_two_ranks_under_the_launcher_match_one_rank(tmp_path):
    # A lock left in the torch extensions cache by a killed process (preemption, SIGKILL) must not
    # hang start-up: CPU ranks never JIT-build DeepSpeed's shared-memory comm op.
    extensions = tmp_path / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(extensions))
    proc = launch(str(SCRIPT.relative_to(REPO)), ["--out", str(tmp_path)], timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    script = _load_script()
    problem = script.make_problem()
    bank = script.make_bank()
    script.fill(bank, problem, 0, 1)
    # Same global bank: gathered contents, and the re-sharded checkpoint of both ranks.
    for result in ranks:
        assert torch.equal(result["contents"], bank.vectors) and torch.equal(result["contents_ids"], bank.ids)
    merged = MemoryBank.reshard([r["shard"] for r in ranks], 1)[0]
    for key, value in bank.state_dict().items():
        assert torch.equal(merged[key], value), key

    # One-rank reference: loss = mean over all global rows, same sampling step.
    linear = torch.nn.Linear(script.IN_FEATURES, script.NUM_LAYERS * script.DIM)
    linear.load_state_dict({"weight": problem["weight"], "bias": problem["bias"]})
    z_s = script.student_vectors(linear, problem["x"])
    sums, k = bank.negative_distance_sums(z_s, problem["ids"], script.K)
    loss = script.cos_nce(z_s, problem["teacher"], sums, k)
    loss.backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), **tol)
    for layer in range(script.NUM_LAYERS):
        torch.testing.assert_close(torch.cat([r["sums"][layer] for r in ranks]), sums[layer].detach(), **tol)
    for result in ranks:  # DeepSpeed-averaged gradients equal the one-rank gradients
        torch.testing.assert_close(result["weight_grad"], linear.weight.grad, **tol)
        torch.testing.assert_close(result["bias_grad"], linear.bias.grad, **tol)

    # Unequal local batches (3 + 1 rows): per-row sums and gradients w.r.t. the own rows.
    z = [v.clone().requires_grad_(True) for v in problem["unequal_z"]]
    unequal, _ = bank.negative_distance_sums(z, problem["unequal_ids"], script.K)
    torch.stack(unequal).square().sum().backward()
    for layer in range(script.NUM_LAYERS):
        torch.testing.assert_close(torch.cat([r["unequal_sums"][layer] for r in ranks]), unequal[layer].detach(), **tol)
        torch.testing.assert_close(torch.cat([r["unequal_grads"][layer] for r in ranks]), z[layer].grad, **tol)
