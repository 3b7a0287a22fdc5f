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


def filled_bank(size=8, dim=5, layers=2, batches=3, batch=3, dtype=torch.float32, seed=0, groups=2):
    """A bank after ``batches`` enqueues of ``batch`` rows; ids count up from 0."""
    bank = MemoryBank(layers, size, dim, dtype=dtype, seed=seed, groups=groups)
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


def unit(v):
    return F.normalize(v.float(), dim=-1, eps=1e-6)


# --------------------------------------------------------------------------- layout and FIFO

def test_group_fifo_wraps_with_exact_slot_contents():
    # 2 groups of 3 slots; row i of an enqueue goes to group (cursor + i) % 2
    bank = MemoryBank(2, 6, 3, dtype=torch.float32, groups=2)
    row = lambda i, layer: torch.tensor([1.0, 10.0 * layer + i, -float(i)])  # noqa: E731
    for ids in ([0, 1], [2, 3, 4], [5, 6, 7]):
        ids = torch.tensor(ids)
        bank.enqueue([torch.stack([row(int(i), layer) for i in ids]) for layer in range(2)], ids)
    # group 0: 0 -> slot 0, 2 -> 1, 4 -> 2, 6 overwrites slot 0; group 1: 1, 3, 5, then 7 overwrites slot 0
    assert bank.ids.tolist() == [6, 2, 4, 7, 3, 5]
    assert bank.group_ptr.tolist() == [1, 1] and bank.group_fill.tolist() == [3, 3] and int(bank.fill) == 6
    assert bank.cursor.tolist() == [0]  # (0 + 2 + 3 + 3) % 2
    for layer in range(2):  # stored normalized
        want = torch.stack([unit(row(i, layer)) for i in (6, 2, 4, 7, 3, 5)])
        torch.testing.assert_close(bank.vectors[layer], want)


def test_fill_count_grows_then_caps():
    bank = MemoryBank(1, 6, 2, groups=3)
    fills = []
    for step in range(4):
        bank.enqueue([torch.ones(4, 2)], torch.arange(4) + 4 * step)
        fills.append((int(bank.fill), bank.group_fill.tolist()))
    assert fills == [(4, [2, 1, 1]), (6, [2, 2, 2]), (6, [2, 2, 2]), (6, [2, 2, 2])]


def test_bytes_per_rank_shrink_as_1_over_world():
    def vector_bytes(world):
        bank = MemoryBank(4, 4096, 128 * 768, rank=world - 1, world_size=world, device="meta", groups=64)
        replicated = (4096 + 2 * 64 + world + 6) * 8  # ids, group pointers/fills, cursors, 4 scalars, shard
        assert bank.bytes_per_rank() - replicated == bank.vectors.numel() * 2
        return bank.vectors.numel() * 2
    assert vector_bytes(1) == 4 * 4096 * 128 * 768 * 2
    assert vector_bytes(2) * 2 == vector_bytes(1) == vector_bytes(4) * 4


def test_vectors_are_stored_normalized_and_zero_stays_zero():
    bank = MemoryBank(1, 4, 3, dtype=torch.float16, groups=1)
    big = torch.tensor([[7e4, 7e4, 0.0], [0.0, 0.0, 0.0]])  # past fp16 range before normalizing
    bank.enqueue([big], torch.tensor([0, 1]))
    assert torch.isfinite(bank.vectors).all()
    torch.testing.assert_close(bank.vectors[0, 0].float(), unit(big[0]), rtol=1e-3, atol=1e-3)
    assert bank.vectors[0, 1].tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- sampling

def test_sampling_excludes_own_id_and_never_repeats():
    bank = MemoryBank(1, 10, 2, groups=2)
    for step in range(3):  # ids mod 7 repeat, as in a later epoch
        bank.enqueue([torch.randn(5, 2)], (torch.arange(5) + 5 * step) % 7)
    positive_ids = torch.tensor([0, 3, 6, 9])
    seen = set()
    for step in range(60):
        slots = bank.sample_slots(positive_ids, 3, bank.make_generator(step))
        assert slots.shape == (4, 3)
        for i, row in enumerate(slots.tolist()):
            assert len(set(row)) == 3
            assert len({s // 5 for s in row}) == 1  # all from one group
            assert all(int(bank.ids[s]) != int(positive_ids[i]) for s in row)
            seen.update((i, s) for s in row)
    for i, pid in enumerate(positive_ids.tolist()):  # every allowed slot is drawn sometimes
        assert {s for r, s in seen if r == i} == {s for s in range(10) if int(bank.ids[s]) != pid}


def test_a_group_without_k_valid_slots_is_never_chosen():
    bank = MemoryBank(1, 8, 2, groups=2)
    bank.enqueue([torch.randn(4, 2)], torch.tensor([5, 1, 5, 2]))  # group 0 holds 5, 5; group 1 holds 1, 2
    for step in range(20):
        slots = bank.sample_slots(torch.tensor([5, 1]), 2, bank.make_generator(step))
        assert sorted(slots[0].tolist()) == [4, 5]  # id 5 fills group 0: only group 1 serves it
        assert sorted(slots[1].tolist()) == [0, 1]
    with pytest.raises(UserError, match="no memory bank group holds 3 negatives for example id 2"):
        bank.sample_slots(torch.tensor([2]), 3, bank.make_generator(0))  # 4 filled, but 2 per group


def test_ready_means_some_group_serves_any_positive():
    bank = MemoryBank(1, 8, 2, groups=2)
    bank.enqueue([torch.randn(4, 2)], torch.tensor([5, 1, 5, 2]))
    assert not bank.ready(2)  # group 0: 2 filled but both id 5; group 1: 2 filled, k + 1 needed
    bank.enqueue([torch.randn(2, 2)], torch.tensor([3, 4]))  # group 0: 5, 5, 3; group 1: 1, 2, 4
    assert bank.ready(2) and not bank.ready(3)
    assert bank.ready(1)


def test_sampling_is_reproducible_and_advances_the_step():
    bank = filled_bank()
    ids = torch.tensor([1, 20])
    first = bank.sample_slots(ids, 2)
    assert int(bank.sample_step) == 1
    assert torch.equal(first, bank.sample_slots(ids, 2, bank.make_generator(0)))
    assert not torch.equal(first, bank.sample_slots(ids, 2))


@pytest.mark.parametrize("world", [2, 4])
def test_draw_does_not_depend_on_the_world_size(world):
    # the same positives against the same contents draw the same slots on every rank of any world
    bank = filled_bank(size=16, batches=5, batch=3, groups=4)
    ids = torch.tensor([0, 4, 13, 99, 7])
    want = bank.sample_slots(ids, 2, bank.make_generator(5))
    for rank, shard in enumerate(MemoryBank.reshard([bank.state_dict()], world)):
        part = MemoryBank(2, 16, 5, rank=rank, world_size=world, dtype=torch.float32, groups=4)
        part.load_state_dict(shard)
        assert torch.equal(part.sample_slots(ids, 2, part.make_generator(5)), want)


# --------------------------------------------------------------------------- distance sums

def test_distance_sums_by_hand():
    bank = MemoryBank(1, 3, 2, dtype=torch.float32, groups=1)
    bank.enqueue([torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])], torch.tensor([0, 1, 2]))
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]], requires_grad=True)
    sums, k = bank.negative_distance_sums([z], torch.tensor([7, 2]), 2)
    # row 0 (id 7): 2 of {g=0, 1, 2}; row 1 (id 2 is excluded): slots 0 and 1, g = 2 * (1 - 1/sqrt 2)
    slots = bank.sample_slots(torch.tensor([7, 2]), 2, bank.make_generator(0))
    expect0 = sum({0: 0.0, 1: 1.0, 2: 2.0}[s] for s in slots[0].tolist())
    assert k == 2
    assert sums[0].tolist() == pytest.approx([expect0, 2 - 2 ** 0.5], abs=1e-6)


def test_distance_sums_match_brute_force_values_and_gradients():
    bank = filled_bank(size=12, dim=7, batches=5)  # wrapped
    z = [torch.randn(4, 7, requires_grad=True) for _ in range(2)]
    ids = torch.tensor([3, 9, 14, 100])
    sums, _ = bank.negative_distance_sums(z, ids, 4, bank.make_generator(3))
    slots = bank.sample_slots(ids, 4, bank.make_generator(3))
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
def test_low_precision_storage_scores_in_fp32_within_the_storage_rounding(dtype):
    bank = MemoryBank(1, 4, 1024, dtype=dtype, groups=1)
    teacher = torch.randn(4, 1024) * 300  # squared norms overflow fp16: normalized in fp32 first
    bank.enqueue([teacher], torch.arange(4))
    assert bank.vectors.dtype == dtype
    torch.testing.assert_close(bank.vectors[0].float(), unit(teacher).to(dtype).float())
    z = torch.randn(2, 1024, requires_grad=True)
    sums, _ = bank.negative_distance_sums([z], torch.tensor([10, 11]), 3, bank.make_generator(0))
    assert sums[0].dtype == torch.float32 and torch.isfinite(sums[0]).all()
    slots = bank.sample_slots(torch.tensor([10, 11]), 3, bank.make_generator(0))
    # the stored rows are summed in the storage dtype (each component of D = sum_k n_k rounded
    # once, at most eps/2 relative), so |error| <= eps/2 * ||D||, D from the stored rows in fp64
    stored = bank.vectors[0].double()
    bound = torch.finfo(dtype).eps / 2 * torch.stack([stored[s].sum(0).norm() for s in slots])
    error = (sums[0].double() - brute_force_sums(bank, [z.detach()], slots)[0]).abs()
    assert (error <= bound + 1e-6).all(), (error, bound)


def test_all_zero_vectors_give_finite_sums_and_gradients():
    bank = MemoryBank(1, 4, 6)
    bank.enqueue([torch.zeros(4, 6)], torch.arange(4))
    z = torch.zeros(3, 6, requires_grad=True)
    sums, _ = bank.negative_distance_sums([z], torch.tensor([7, 8, 9]), 2)
    assert sums[0].tolist() == [2.0, 2.0, 2.0]  # cosine 0 with everything: g = 1 per negative
    sums[0].sum().backward()
    assert torch.isfinite(z.grad).all()


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
    negatives = bank.draw(ids, 4, gen)
    assert len(calls) == 2  # one per layer, at the draw
    first, second = score(negatives), score(negatives)
    assert len(calls) == 2  # passes do not touch the bank's rows
    for a, b in zip(first[0] + list(first[1]), second[0] + list(second[1])):
        assert torch.equal(a, b)
    fresh = score(bank.draw(ids, 4, bank.make_generator(2)))  # the same draw made again: the same numbers
    for a, b in zip(first[0] + list(first[1]), fresh[0] + list(fresh[1])):
        assert torch.equal(a, b)
    bank.enqueue([torch.randn(3, 7) for _ in range(2)], torch.arange(3) + 60)
    slots = bank.sample_slots(ids, 4, bank.make_generator(3))
    for got, want in zip(score(bank.draw(ids, 4, bank.make_generator(3)))[0],
                         brute_force_sums(bank, [t.detach() for t in z], slots)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="drawn for 3 rows"):
        negatives([t[:2] for t in z])


def test_narrower_vectors_are_zero_padded_to_the_bank_width():
    # flatten pooling of a batch padded to fewer tokens: the bank pads, no cosine changes
    bank = filled_bank(size=8, dim=5, batches=2)
    narrow = [torch.randn(2, 3) for _ in range(2)]
    wide = [torch.nn.functional.pad(v, (0, 2)) for v in narrow]
    a, _ = bank.negative_distance_sums(narrow, torch.tensor([40, 41]), 2, bank.make_generator(0))
    b, _ = bank.negative_distance_sums(wide, torch.tensor([40, 41]), 2, bank.make_generator(0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    bank.enqueue(narrow, torch.tensor([50, 51]))  # cursor 0: 50 -> group 0 slot 3, 51 -> group 1 slot 3
    vectors, _ = bank.global_contents()
    torch.testing.assert_close(vectors[0, 3], unit(wide[0][0]))
    torch.testing.assert_close(vectors[1, 7], unit(wide[1][1]))


def test_held_vectors_join_the_bank_at_flush():
    bank = filled_bank(size=8, dim=5, batches=1, groups=1)
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
    copy = MemoryBank(2, 8, 5, dtype=torch.float32, groups=2)
    copy.load_state_dict(bank.state_dict())
    for name, buf in bank.named_buffers():
        assert torch.equal(buf, dict(copy.named_buffers())[name]), name
    z, ids = [torch.randn(2, 5) for _ in range(2)], torch.tensor([1, 2])
    for b in (bank, copy):
        b.enqueue([torch.ones(3, 5), -torch.ones(3, 5)], torch.tensor([30, 31, 32]))
    a_sums, _ = bank.negative_distance_sums(z, ids, 2)
    b_sums, _ = copy.negative_distance_sums(z, ids, 2)
    for a, b in zip(a_sums, b_sums):
        assert torch.equal(a, b)


def test_reshard_moves_whole_groups_and_preserves_the_global_bank():
    bank = filled_bank(size=16, batches=7, dtype=torch.float16, groups=4)  # wrapped groups
    one = [bank.state_dict()]
    by_group = bank.vectors.view(2, 4, 4, 5)
    two = MemoryBank.reshard(one, 2)
    assert [s["shard"].tolist() for s in two] == [[0, 2], [1, 2]]
    assert torch.equal(two[1]["vectors"], by_group[:, [1, 3]].reshape(2, 8, 5))  # groups 1 and 3 on rank 1
    four = MemoryBank.reshard(two, 4)
    assert torch.equal(four[2]["vectors"], by_group[:, 2])  # group 2 alone on rank 2
    assert all(s["cursor"].tolist() == [0] * 4 for s in four)  # cursors restart
    for shards in (MemoryBank.reshard(two, 1), MemoryBank.reshard(four, 1), MemoryBank.reshard(four, 2)):
        back = MemoryBank.reshard(shards, 1)[0]
        for key, value in one[0].items():
            if key != "cursor":
                assert torch.equal(back[key], value), key
    shard = MemoryBank(2, 16, 5, rank=3, world_size=4, dtype=torch.float16, groups=4)
    shard.load_state_dict(four[3])  # per-shard load needs no process group
    assert torch.equal(shard.vectors, by_group[:, 3])
    assert torch.equal(shard.group_ptr, bank.group_ptr) and int(shard.fill) == 16


def test_loading_a_shard_of_another_world_or_layout_is_a_user_error():
    bank = filled_bank()
    two = MemoryBank.reshard([bank.state_dict()], 2)
    with pytest.raises(UserError, match="reshard"):
        MemoryBank(2, 8, 5, dtype=torch.float32, groups=2).load_state_dict(two[0])
    with pytest.raises(UserError, match="shape"):
        MemoryBank(2, 8, 6, dtype=torch.float32, groups=2).load_state_dict(bank.state_dict())
    with pytest.raises(UserError, match="--bank_groups 2"):
        MemoryBank(2, 8, 5, dtype=torch.float32, groups=4).load_state_dict(bank.state_dict())
    with pytest.raises(UserError, match="world size must divide --bank_groups"):
        MemoryBank.reshard(two, 3)
    with pytest.raises(UserError, match="world size must divide --bank_groups"):
        MemoryBank.reshard(two, 4)
    with pytest.raises(UserError, match="labelled"):
        MemoryBank.reshard(two[::-1], 1)
    old = {key: value for key, value in bank.state_dict().items() if key not in ("groups", "group_ptr",
                                                                                   "group_fill", "cursor")}
    old["write_ptr"] = torch.tensor(0)
    for attempt in (lambda: MemoryBank(2, 8, 5, dtype=torch.float32, groups=2).load_state_dict(old),
                    lambda: MemoryBank.reshard([old], 1)):
        with pytest.raises(UserError, match="old ungrouped layout .* cannot be converted"):
            attempt()


# --------------------------------------------------------------------------- user errors

def test_user_errors():
    with pytest.raises(UserError, match="not divisible by the data-parallel world size 4"):
        MemoryBank(1, 12, 4, rank=0, world_size=4, groups=6)
    with pytest.raises(UserError, match="not divisible by its 3 groups"):
        MemoryBank(1, 10, 4, groups=3)
    bank = filled_bank(size=8, batches=1)  # 3 filled slots: group 0 holds ids 0, 2; group 1 holds 1
    with pytest.raises(UserError, match="holds only 3"):
        bank.negative_distance_sums([torch.randn(1, 5)] * 2, torch.tensor([50]), 4)
    with pytest.raises(UserError, match="no memory bank group holds 2 negatives for example id 0"):
        bank.negative_distance_sums([torch.randn(1, 5)] * 2, torch.tensor([0]), 2)
    with pytest.raises(UserError, match="groups of 4 slots .* larger than the number of negatives"):
        bank.validate(4, 4)
    with pytest.raises(UserError, match="global batch size"):
        bank.validate(3, 16)
    bank.validate(3, 8)
    with pytest.raises(UserError, match="does not fit"):
        bank.enqueue([torch.randn(9, 5)] * 2, torch.arange(9))
    with pytest.raises(UserError, match="2 layers"):
        bank.enqueue([torch.randn(2, 5)], torch.arange(2))
    with pytest.raises(UserError, match="non-negative"):
        bank.enqueue([torch.randn(2, 5)] * 2, torch.tensor([0, -1]))
    with pytest.raises(UserError, match=r"at most 5"):  # narrower vectors are zero-padded, wider ones refused
        bank.enqueue([torch.randn(2, 6)] * 2, torch.arange(2))


# --------------------------------------------------------------------------- 2 and 4 ranks, real launcher

def _load_script():
    spec = importlib.util.spec_from_file_location("bank_equivalence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(world, out):
    # A lock left in the torch extensions cache by a killed process (preemption, SIGKILL) must not
    # hang start-up: CPU ranks never JIT-build DeepSpeed's shared-memory comm op.
    extensions = out / "torch_extensions"
    (extensions / "deepspeed_shm_comm").mkdir(parents=True)
    (extensions / "deepspeed_shm_comm" / "lock").touch()
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(extensions))
    proc = launch(str(SCRIPT.relative_to(REPO)), ["--out", str(out)], num_ranks=world, timeout=400, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


RESULTS: dict = {}


def launched(world, tmp_path_factory):
    """One launcher run per world size, shared by the tests below."""
    if world not in RESULTS:
        RESULTS[world] = _launch(world, tmp_path_factory.mktemp(f"world{world}"))
    return RESULTS[world]


needs_launcher = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")


@needs_launcher
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_under_the_launcher_match_one_rank(world, tmp_path_factory):
    ranks = launched(world, tmp_path_factory)
    script = _load_script()
    problem = script.make_problem(world)
    # One rank with the same global bank: the shards re-sharded to one, and the gathered contents.
    merged = MemoryBank.reshard([r["shard"] for r in ranks], 1)[0]
    bank = script.make_bank()
    bank.load_state_dict(merged)
    for result in ranks:
        assert torch.equal(result["contents"], bank.vectors) and torch.equal(result["contents_ids"], bank.ids)
    by_group = bank.vectors.view(script.NUM_LAYERS, script.GROUPS, -1, script.DIM)
    for rank, result in enumerate(ranks):  # group g lives on rank g % world
        assert torch.equal(result["shard"]["vectors"],
                           by_group[:, rank::world].reshape(script.NUM_LAYERS, -1, script.DIM))

    # One-rank reference: loss = mean over all global rows, the same sampling step and draw.
    linear = torch.nn.Linear(script.IN_FEATURES, script.NUM_LAYERS * script.DIM)
    linear.load_state_dict({"weight": problem["weight"], "bias": problem["bias"]})
    z_s = script.student_vectors(linear, problem["x"])
    sums, k = bank.negative_distance_sums(z_s, problem["ids"], script.K)
    loss = script.cos_nce(z_s, problem["teacher"], sums, k)
    loss.backward()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / world, loss.detach(), **tol)
    for layer in range(script.NUM_LAYERS):
        torch.testing.assert_close(torch.cat([r["sums"][layer] for r in ranks]), sums[layer].detach(), **tol)
    for result in ranks:  # DeepSpeed-averaged gradients equal the one-rank gradients
        torch.testing.assert_close(result["weight_grad"], linear.weight.grad, **tol)
        torch.testing.assert_close(result["bias_grad"], linear.bias.grad, **tol)

    # Unequal local batches: per-row sums and gradients w.r.t. the own rows.
    z = [v.clone().requires_grad_(True) for v in problem["unequal_z"]]
    unequal, _ = bank.negative_distance_sums(z, problem["unequal_ids"], script.K)
    torch.stack(unequal).square().sum().backward()
    for layer in range(script.NUM_LAYERS):
        torch.testing.assert_close(torch.cat([r["unequal_sums"][layer] for r in ranks]), unequal[layer].detach(), **tol)
        torch.testing.assert_close(torch.cat([r["unequal_grads"][layer] for r in ranks]), z[layer].grad, **tol)


@needs_launcher
@pytest.mark.parametrize("world", [2, 4])
def test_batch_negatives_under_the_launcher_match_one_rank(world, tmp_path_factory):
    from lrcbert.method.negatives import batch_negative_distance_sums, draw_batch_rows, negative_generator

    ranks = launched(world, tmp_path_factory)
    script = _load_script()
    problem = script.make_problem(world)
    split = list(script.BATCH_SPLITS[world])
    width = script.DIM  # the widest rank's vectors: the others are zero-padded
    pool = [torch.cat([F.pad(t, (0, width - t.shape[1])) for t in layer]) for layer in problem["batch_teacher"]]
    rows = draw_batch_rows(split, script.BATCH_K, negative_generator(script.SEED, 3))
    for i, row in enumerate(rows.tolist()):
        assert i not in row and len(set(row)) == script.BATCH_K
    z = [v.clone().requires_grad_(True) for v in problem["batch_z"]]
    sums = batch_negative_distance_sums(z, pool, rows)
    torch.stack(sums).square().sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5)
    assert all(r["batch_k"] == script.BATCH_K for r in ranks)
    for layer in range(script.NUM_LAYERS):
        torch.testing.assert_close(torch.cat([r["batch_sums"][layer] for r in ranks]), sums[layer].detach(), **tol)
        torch.testing.assert_close(torch.cat([r["batch_grads"][layer] for r in ranks]), z[layer].grad, **tol)


@needs_launcher
def test_vector_traffic_per_rank_does_not_grow_with_the_world_size(tmp_path_factory):
    script = _load_script()
    vector_bytes = script.TRAFFIC_ROWS * script.NUM_LAYERS * script.DIM * 4  # fp32 sums of this rank's rows
    per_world = {}
    for world in (2, 4):
        traffic = [r["traffic"] for r in launched(world, tmp_path_factory)]
        draw = [t["bank_draw_score"] for t in traffic]
        # the bank: every rank receives exactly its rows' direction sums; sends as much on average
        assert [d["float_received"] for d in draw] == [vector_bytes] * world
        assert sum(d["float_sent"] for d in draw) == world * vector_bytes
        # enqueue moves no vector at all: only ids and batch sizes
        assert all("float_sent" not in t["bank_enqueue"] for t in traffic)
        # batch negatives: at most c = ceil((K + 1) / B_min) owners' partial sums per row
        c = min(world, -(-(script.BATCH_K + 1) // script.TRAFFIC_ROWS))
        batch = [t["batch_draw_score"] for t in traffic]
        assert all(b["float_received"] <= c * vector_bytes for b in batch)
        assert sum(b["float_sent"] for b in batch) == sum(b["float_received"] for b in batch)
        per_world[world] = (draw[0]["float_received"], c)
    assert per_world[2] == per_world[4]
