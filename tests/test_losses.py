"""Losses against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from lrcbert.method import losses
from lrcbert.method.losses import LossWeights


def test_angular_distance_hand_values():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    got = losses.angular_distance(x, y)
    assert torch.allclose(got, torch.tensor([0.0, 1.0, 2.0, 1 - 1 / math.sqrt(2)]), atol=1e-6)


def test_angular_distance_fp16_input_is_computed_in_fp32():
    # a flattened 128 x 768 state of magnitude 30 has a squared norm far past fp16's max
    x = torch.full((1, 128 * 768), 30.0, dtype=torch.float16)
    y = torch.full((1, 128 * 768), 30.0, dtype=torch.float16)
    d = losses.angular_distance(x, y)
    assert d.dtype == torch.float32
    assert torch.isfinite(d).all() and abs(float(d)) < 1e-5


def test_pool_modes_hand_values():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2), last token padding
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(losses.pool(h, mask, "flatten"), torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 0.0]]))
    assert torch.equal(losses.pool(h, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(losses.pool(h, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown pooling"):
        losses.pool(h, mask, "max")


def test_flatten_padding_length_does_not_change_cosines():
    torch.manual_seed(0)
    a, b = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0]])
    short = losses.angular_distance(losses.pool(a[:, :3], mask[:, :3]), losses.pool(b[:, :3], mask[:, :3]))
    long = losses.angular_distance(losses.pool(a, mask), losses.pool(b, mask))
    assert torch.allclose(short, long, atol=1e-6)


def test_all_masked_input_gives_zero_not_nan():
    h = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.long)
    for mode in losses.POOLING_MODES:
        z = losses.pool(h, mask, mode)
        assert torch.equal(z, torch.zeros_like(z))
    z_s = losses.pool(h, mask)
    pos = losses.angular_distance(z_s, z_s)
    loss = losses.cos_nce(pos, torch.ones(2) * 3, 3, valid=mask.sum(1) > 0)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(h.grad).all()


def test_cos_nce_formula_hand_value():
    # g_pos = 0.5, negatives g = 1.2 and 1.8 (K = 2)
    # L = 0.5 + (4 - ((1.2 - 0.5) + (1.8 - 0.5))) / 4 = 0.5 + (4 - 2) / 4 = 1.0
    loss = losses.cos_nce(torch.tensor([0.5]), torch.tensor([3.0]), 2)
    assert torch.allclose(loss, torch.tensor(1.0))


def test_cos_nce_from_vectors_matches_explicit_formula():
    torch.manual_seed(1)
    z_s, z_t, negs = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 4, 5)
    g_pos = 1 - F.cosine_similarity(z_t, z_s, dim=-1)
    g_neg = 1 - F.cosine_similarity(negs, z_s.unsqueeze(1), dim=-1)  # (3, 4)
    k = 4
    expected = (g_pos + (2 * k - (g_neg - g_pos.unsqueeze(1)).sum(1)) / (2 * k)).mean()
    got = losses.cos_nce(losses.angular_distance(z_t, z_s), losses.angular_distance(negs, z_s.unsqueeze(1)).sum(1), k)
    assert torch.allclose(got, expected, atol=1e-6)


def test_centered_cos_nce_hand_value_and_no_gain_from_the_mean_direction():
    # g_pos = 0.5, negatives g = 1.2 and 1.8 (K = 2): L = 1 + 1.5 * (0.5 - 1.5) = -0.5
    loss = losses.cos_nce(torch.tensor([0.5]), torch.tensor([3.0]), 2, form="centered")
    assert torch.allclose(loss, torch.tensor(-0.5))
    # teacher vectors sharing a mean direction; a student that gives every input one vector,
    # scored with every other row as its negatives (K = B - 1)
    torch.manual_seed(0)
    b = 8
    teacher = torch.randn(b, 16) + 3.0 * torch.randn(16)
    others = torch.stack([torch.cat([teacher[:i], teacher[i + 1:]]) for i in range(b)])  # (B, B-1, F)

    def constant_student(z, form):
        z_s = z.expand(b, -1)
        neg = losses.angular_distance(others, z_s.unsqueeze(1)).sum(1)
        return float(losses.cos_nce(losses.angular_distance(teacher, z_s), neg, b - 1, form=form))

    mean_dir, random_dir = teacher.mean(0), torch.randn(16)
    # the paper's form rewards the collapsed student for pointing at the teacher's mean ...
    assert constant_student(mean_dir, "paper") < constant_student(random_dir, "paper") - 0.3
    # ... the centered form charges it 1 wherever it points
    assert constant_student(mean_dir, "centered") == pytest.approx(1.0, abs=1e-5)
    assert constant_student(random_dir, "centered") == pytest.approx(1.0, abs=1e-5)
    # telling inputs apart is what lowers it: the student equal to the teacher
    neg = losses.angular_distance(others, teacher.unsqueeze(1)).sum(1)
    assert float(losses.cos_nce(torch.zeros(b), neg, b - 1, form="centered")) < 0.9
    with pytest.raises(ValueError, match="form"):
        losses.cos_nce(torch.tensor([0.5]), torch.tensor([3.0]), 2, form="softmax")


def test_cos_nce_valid_mask_averages_valid_rows_only():
    loss = losses.cos_nce(torch.tensor([0.5, 0.0]), torch.tensor([3.0, 0.0]), 2, valid=torch.tensor([True, False]))
    assert torch.allclose(loss, torch.tensor(1.0))


def test_soft_loss_hand_value():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0) * 1.1, 0.0]])  # softmax(t / 1.1) = (0.75, 0.25)
    expected = 1.1**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    assert torch.allclose(losses.soft_loss(s, t, 1.1), torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_soft_loss_regression_is_mse():
    got = losses.soft_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]]), regression=True)
    assert torch.allclose(got, torch.tensor(2.5))


def test_hard_loss_ce_and_mse():
    logits = torch.tensor([[math.log(3.0), 0.0]])
    assert torch.allclose(losses.hard_loss(logits, torch.tensor([0])), torch.tensor(-math.log(0.75)), atol=1e-6)
    assert torch.allclose(losses.hard_loss(torch.tensor([[3.0]]), torch.tensor([1.0]), regression=True), torch.tensor(4.0))


def test_hidden_mse_masks_padding():
    s = torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])
    t = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
    assert torch.allclose(losses.hidden_mse(s, t, torch.tensor([[1, 0]])), torch.tensor((1 + 4) / 2))


def test_combine_weights_and_logs():
    parts = {"cos": torch.tensor(2.0), "soft": torch.tensor(float("nan")), "hard": torch.tensor(0.5)}
    total, logs = losses.combine(parts, LossWeights(1.0, 0.0, 3.0))
    assert torch.allclose(total, torch.tensor(3.5))  # the zero-weighted NaN never leaks in
    assert set(logs) == {"cos", "soft", "hard", "total"}
    assert float(logs["total"]) == 3.5
