"""Layer map, schedule, negatives, perturbation, objective, batching and config parsing."""

import dataclasses

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lrcbert.method import losses
from lrcbert.data.batches import Encoded, TrainOrder, collate, eval_shard
from lrcbert.config import parse_args
from lrcbert.method.objective import LRCObjective, ObjectiveConfig
from lrcbert.errors import UserError
from lrcbert.method.layer_map import Projections, format_layer_map, parse_layer_map, uniform_layer_map
from lrcbert.method.losses import LossWeights
from lrcbert.models import DistillStudent
from lrcbert.method.negatives import batch_negative_distance_sums, sample_other_rows
from lrcbert.method.perturb import perturbation_delta
from lrcbert.method.schedule import TwoStageSchedule, parse_weights, warmup_linear_decay


# ---------------------------------------------------------------- layer map

def test_uniform_layer_map_paper_and_uneven():
    assert uniform_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert uniform_layer_map(4, 6) == [(1, 1), (2, 3), (3, 4), (4, 6)]
    assert uniform_layer_map(6, 6) == [(i, i) for i in range(1, 7)]


def test_impossible_layer_map_is_a_clear_error():
    with pytest.raises(UserError, match="must not be deeper"):
        uniform_layer_map(8, 6)
    with pytest.raises(UserError, match="lists 2 teacher layers"):
        parse_layer_map("3,6", 4, 12)
    with pytest.raises(UserError, match="outside 1..12"):
        parse_layer_map("3,6,9,13", 4, 12)
    assert parse_layer_map("2,4,8,12", 4, 12) == [(1, 2), (2, 4), (3, 8), (4, 12)]


def test_layer_map_table_and_projection_shapes():
    table = format_layer_map([(1, 3), (2, 6)], 312, 768)
    assert "312 x 768" in table and table.count("\n") == 3
    proj = Projections(2, 312, 768)
    assert proj(1, torch.zeros(2, 5, 312)).shape == (2, 5, 768)


# ---------------------------------------------------------------- schedule

def test_two_stage_schedule_80_20():
    sched = TwoStageSchedule(total_steps=10)
    assert [sched.stage(s) for s in range(10)] == [1] * 8 + [2] * 2
    assert sched.weights(7) == LossWeights(1, 0, 0)
    assert sched.weights(8) == LossWeights(1, 1, 3)
    one = TwoStageSchedule(10, stage1_fraction=0.0)
    assert all(one.stage(s) == 2 for s in range(10))
    assert parse_weights("2:0.5:1", "--x") == LossWeights(2, 0.5, 1)
    with pytest.raises(UserError, match="--stage2_weights"):
        parse_weights("1:1", "--stage2_weights")


def test_prediction_ramp_raises_beta_gamma_linearly_and_keeps_alpha():
    ramp = TwoStageSchedule(100, stage1_fraction=0.0, prediction_ramp=0.25)
    assert ramp.ramp_steps == 25
    assert ramp.weights(0) == LossWeights(1, 1 / 25, 3 / 25)
    mid = ramp.weights(12)
    assert mid.alpha == 1 and mid.beta == pytest.approx(13 / 25) and mid.gamma == pytest.approx(39 / 25)
    assert ramp.weights(24) == LossWeights(1, 1, 3) == ramp.weights(99)
    # with two stages the ramp spans stage 2's own steps, and stage 1 is untouched
    two = TwoStageSchedule(100, stage1_fraction=0.8, prediction_ramp=0.5)
    assert two.weights(79) == LossWeights(1, 0, 0)
    assert two.weights(80) == LossWeights(1, 0.1, pytest.approx(0.3))
    assert two.weights(89) == LossWeights(1, 1, 3)
    assert TwoStageSchedule(100, 0.0).weights(0) == LossWeights(1, 1, 3)  # off by default
    with pytest.raises(UserError, match="--prediction_ramp"):
        TwoStageSchedule(100, 0.0, prediction_ramp=1.5)


def test_warmup_linear_decay():
    f = warmup_linear_decay(2, 10)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


# ---------------------------------------------------------------- negatives

def test_negative_sampling_never_picks_self_and_is_distinct():
    gen = torch.Generator().manual_seed(0)
    for offset in (0, 4, 8):
        idx = sample_other_rows(4, 12, offset, 11, gen)
        for i, row in enumerate(idx.tolist()):
            assert offset + i not in row
            assert len(set(row)) == 11
    with pytest.raises(ValueError):
        sample_other_rows(4, 4, 0, 4, gen)


def test_batch_negative_sums_brute_force():
    torch.manual_seed(0)
    z_s = torch.randn(2, 6)
    pool = torch.randn(5, 4)  # narrower pool width: zero-padded
    idx = torch.tensor([[1, 2], [0, 4]])
    got = batch_negative_distance_sums([z_s], [pool], idx)[0]
    padded = torch.nn.functional.pad(pool, (0, 2))
    want = torch.stack([sum(losses.angular_distance(padded[j], z_s[i]) for j in idx[i].tolist()) for i in range(2)])
    assert torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- perturbation

def test_perturbation_delta_direction_norm_and_no_param_grads():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 1)
    e = torch.randn(3, 2, 4, requires_grad=True)
    loss = lin(e).pow(2).sum()
    delta = perturbation_delta(loss, e, epsilon=0.5)
    assert delta.shape == e.shape and not delta.requires_grad
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((3,), 0.5), atol=1e-6)
    (g,) = torch.autograd.grad(lin(e).pow(2).sum(), e)
    cos = torch.nn.functional.cosine_similarity(delta.flatten(1), g.flatten(1), dim=1)
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)
    assert lin.weight.grad is None  # only the embedding output was differentiated


def test_perturbation_overflow_returns_none():
    e = torch.ones(1, 2, requires_grad=True)
    assert perturbation_delta((e * float("inf")).sum(), e, 1.0) is None


def _tiny_student(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    return DistillStudent(BertForSequenceClassification(cfg), [1, 2], teacher_width=24)


def test_seeded_perturbation_is_reproducible_and_changes_the_loss():
    def run():
        model = _tiny_student()
        model.eval()
        ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(3))
        mask = torch.ones_like(ids)
        logits, hidden, emb, projected = model(ids, mask)
        assert len(hidden) == 3 and projected[0].shape == (3, 7, 24)
        loss = losses.hard_loss(logits, torch.tensor([0, 1, 0]))
        delta = perturbation_delta(loss, emb, 1.0)
        logits2, *_ = model(ids, mask, embedding_delta=delta)
        return float(loss.detach()), float(losses.hard_loss(logits2.detach(), torch.tensor([0, 1, 0]))), delta
    a, b = run(), run()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[1] > a[0]  # moving along the gradient raises the loss


# ---------------------------------------------------------------- objective

def test_objective_parts_and_gradients_reach_projections():
    model = _tiny_student()
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    t_hidden = [torch.randn(4, 6, 24) for _ in range(5)]
    objective = LRCObjective([(1, 2), (2, 4)], ObjectiveConfig(num_negatives=15))
    t_vec = objective.teacher_vectors(t_hidden, mask)
    negatives = objective.batch_negatives(t_vec, torch.Generator().manual_seed(0))
    logits, _, _, projected = model(ids, mask)
    total, logs = objective(LossWeights(1, 1, 3), mask, projected, t_hidden, t_vec, negatives,
                            logits, torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    assert {"cos", "cos_layer1", "cos_layer2", "soft", "hard", "total"} <= set(logs)
    assert torch.allclose(logs["cos"], logs["cos_layer1"] + logs["cos_layer2"])
    assert torch.allclose(total, logs["cos"] + logs["soft"] + 3 * logs["hard"])
    total.backward()
    assert model.projections.layers[0].weight.grad.abs().sum() > 0


def test_objective_mse_and_none_variants():
    model = _tiny_student()
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    t_hidden = [torch.randn(2, 5, 24) for _ in range(3)]
    _, _, _, projected = model(ids, mask)
    _, logs = LRCObjective([(1, 1), (2, 2)], ObjectiveConfig(intermediate="mse"))(
        LossWeights(1, 0, 0), mask, projected, t_hidden)
    assert float(logs["mse"]) > 0 and "cos" not in logs  # logged under its own name
    _, logs = LRCObjective([(1, 1), (2, 2)], ObjectiveConfig(intermediate="none"))(
        LossWeights(1, 0, 0), mask, projected, t_hidden)
    assert "cos" not in logs


# ---------------------------------------------------------------- batching

def test_train_order_ranks_disjoint_equal_and_deterministic():
    a = TrainOrder(50, micro_batch_size=4, world_size=2, rank=0, gradient_accumulation_steps=2, seed=7)
    b = TrainOrder(50, micro_batch_size=4, world_size=2, rank=1, gradient_accumulation_steps=2, seed=7)
    assert a.steps_per_epoch == 3 and a.micro_batches_per_epoch == 6
    seen = set()
    for m in range(6):
        ra, rb = set(a.rows(m).tolist()), set(b.rows(m).tolist())
        assert len(ra) == len(rb) == 4 and not ra & rb and not (ra | rb) & seen
        seen |= ra | rb
    assert a.rows(6).tolist() != a.rows(0).tolist()  # new epoch, new permutation
    c = TrainOrder(50, 4, 2, 0, 2, 7)
    assert c.rows(9).tolist() == a.rows(9).tolist()  # position is just the micro-step count


def test_eval_shards_cover_everything_with_equal_counts():
    shards = [eval_shard(11, 2, r, 3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert {int(x) for s in shards for b in s for x in b} == set(range(11))


def test_collate_pads_and_masks():
    data = Encoded([[1, 2, 3], [4]], [[0, 0, 1], [0]], [1, 0], [0, 1])
    batch = collate(data, [0, 1], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


# ---------------------------------------------------------------- typed flags

@dataclasses.dataclass
class _Args:
    """Demo."""
    task: str = dataclasses.field(metadata={"help": "the task"})
    steps: int = dataclasses.field(default=3, metadata={"help": "steps"})
    perturb: bool = dataclasses.field(default=True, metadata={"help": "on/off"})
    lr: float | None = dataclasses.field(default=None, metadata={"help": "lr"})


def test_parse_args_types_bools_and_launcher_flag():
    args = parse_args(_Args, ["--task", "sst2", "--steps", "5", "--perturb", "false", "--local_rank=1"])
    assert args == _Args("sst2", 5, False, None)


def test_unknown_flag_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(_Args, ["--task", "x", "--stepz", "5"])
    assert "--stepz" in capsys.readouterr().err


def test_perturbed_loss_routes_passes_and_modes():
    from lrcbert.method.perturb import perturbed_loss

    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    e0 = torch.randn(2, 3, 4)
    calls = []

    def make_forward(name):
        def forward(delta):
            calls.append((name, delta is not None))
            e = (e0 + (0 if delta is None else delta)).requires_grad_(delta is None)
            return e, (e * w).sum(-1).pow(2).mean()
        return forward

    def loss_of(forward, delta):
        e, loss = forward(delta)
        return loss, {"total": loss.detach()}, e

    engine_fwd, bare_fwd = make_forward("engine"), make_forward("bare")
    loss, logs = perturbed_loss(loss_of, engine_fwd, bare_fwd, epsilon=0.5)
    assert calls == [("bare", False), ("engine", True)]  # clean pass bare, trained pass through the engine
    assert float(logs["perturb_skipped"]) == 0.0 and "clean/total" in logs
    assert float(loss.detach()) > float(logs["clean/total"])  # the shift follows the gradient
    calls.clear()
    added, logs = perturbed_loss(loss_of, engine_fwd, bare_fwd, epsilon=0.5, mode="add")
    assert torch.allclose(added, logs["clean/total"] + loss)
    calls.clear()
    inf_w = torch.full((4,), float("inf"), requires_grad=True)

    def overflowing(forward, delta):
        e, _ = forward(delta)
        loss = (e * inf_w).sum()
        return loss, {"total": loss.detach()}, e

    loss, logs = perturbed_loss(overflowing, engine_fwd, bare_fwd, epsilon=0.5)
    assert calls == [("bare", False), ("engine", False)]  # fell back to an unperturbed engine pass
    assert float(logs["perturb_skipped"]) == 1.0


def test_seed_everything_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from lrcbert.runtime.checkpoints import seed_everything

    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]


def test_progress_written_to_a_file_is_a_readable_line_not_carriage_returns(tmp_path, capsys):
    from lrcbert.monitor import Monitor

    monitor = Monitor(str(tmp_path / "tb"), total_steps=5, initial_step=0, enabled=True, desc="distill sst2",
                      line_interval_s=0.0)
    for _ in range(5):
        monitor.advance({"loss": 1.5})
    monitor.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("distill sst2")]
    assert len(lines) == 5 and lines[-1].startswith("distill sst2: step 5/5 (100%), loss 1.5")
