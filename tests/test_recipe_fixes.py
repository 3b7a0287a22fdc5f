"""The task recipe's fixes: per-stage learning rate, regression head start, relative and
padding-blind perturbation, shared dropout masks, per-rank dropout, the collapse watch."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from lrcbert.errors import UserError
from lrcbert.method.losses import LossWeights, mean_pairwise_cosine
from lrcbert.method.objective import LRCObjective, ObjectiveConfig, TeacherOutputs
from lrcbert.method.perturb import PerturbConfig, perturbation_delta, perturbed_loss
from lrcbert.method.schedule import two_stage_lr, warmup_linear_decay
from lrcbert.models import DistillStudent, init_regression_head
from lrcbert.runtime.run import Run


def _student(num_labels=2, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return DistillStudent(BertForSequenceClassification(cfg), [1, 2], teacher_width=24)


# ---------------------------------------------------------------- learning rate

def test_each_loss_stage_warms_up_to_the_peak_and_decays_to_zero():
    f = two_stage_lr(0.1, total_steps=100, stage2_start=80)
    assert f(7) == 1.0 and f(79) < 0.05  # stage 1: 8 warm-up steps, decays to ~0 at its end
    assert f(80) == 0.5 and f(81) == 1.0  # stage 2 warms up again over 2 steps to the full peak
    assert f(99) == pytest.approx(1 / 18) and f(100) == 0.0
    whole = warmup_linear_decay(10, 100)
    assert whole(80) < 0.25  # what stage 2 started at under one schedule for the whole run
    no_stage2 = two_stage_lr(0.1, 100, 0)
    assert [no_stage2(s) for s in range(100)] == [whole(s) for s in range(100)]


# ---------------------------------------------------------------- regression head

def test_regression_head_starts_at_the_label_mean():
    model = _student(num_labels=1).model
    init_regression_head(model, 2.7)
    ids = torch.randint(1, 50, (4, 6))
    model.classifier.weight.data.zero_()  # isolate the bias: the output is the offset
    assert torch.allclose(model(input_ids=ids).logits, torch.full((4, 1), 2.7))
    with pytest.raises(UserError, match="regression head"):
        init_regression_head(_student(num_labels=2).model, 2.7)


# ---------------------------------------------------------------- perturbation

def test_relative_radius_is_a_share_of_the_real_tokens_norm_whatever_the_padding():
    torch.manual_seed(0)
    w = torch.randn(8)
    e = torch.randn(2, 5, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = ((e * mask[..., None]) @ w).pow(2).sum()
    delta = perturbation_delta(loss, e, 0.1, attention_mask=mask, relative=True)
    real_norm = (e.detach() * mask[..., None]).flatten(1).norm(dim=1)
    assert torch.allclose(delta.flatten(1).norm(dim=1), 0.1 * real_norm, rtol=1e-5)
    assert delta[0, 3:].abs().sum() == 0  # padding is never shifted
    # the same sentence padded further gets the same shift on its real tokens
    longer = torch.cat([e.detach()[:1], torch.randn(1, 3, 8)], dim=1).requires_grad_(True)
    mask_long = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    loss_long = ((longer * mask_long[..., None]) @ w).pow(2).sum()
    delta_long = perturbation_delta(loss_long, longer, 0.1, attention_mask=mask_long, relative=True)
    assert torch.allclose(delta_long[0, :3], delta[0, :3], atol=1e-6)


def test_perturbed_pass_draws_the_clean_pass_dropout_masks():
    model = _student(dropout=0.3).train()
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def loss_of(forward, delta=None):
        logits, _, embeddings, _ = forward(ids, mask, None, None if delta is None else delta * 0.0)
        return logits.pow(2).sum(), {"total": logits.pow(2).sum().detach()}, embeddings

    # a zero shift: with the clean pass's masks the perturbed loss equals the clean one
    _, logs = perturbed_loss(loss_of, model, model, 0.1, same_dropout=True)
    assert torch.equal(logs["total"], logs["clean/total"])
    _, logs = perturbed_loss(loss_of, model, model, 0.1, same_dropout=False)
    assert not torch.equal(logs["total"], logs["clean/total"])  # new masks, another loss


def test_the_loss_step_logs_the_collapse_watch():
    model = _student(num_labels=2).train()
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([0, 1, 1, 0])}
    t_hidden = tuple(torch.randn(4, 6, 24) for _ in range(3))
    objective = LRCObjective([(1, 1), (2, 2)], ObjectiveConfig(num_negatives=3))
    teacher = TeacherOutputs(torch.randn(4, 2), t_hidden, objective.teacher_vectors(t_hidden, batch["attention_mask"]))
    negatives = objective.batch_negatives(teacher.vectors, torch.Generator().manual_seed(0))
    loss, logs = objective.step(model, batch, teacher, LossWeights(1, 1, 3), negatives,
                                perturb=PerturbConfig(epsilon=0.01), probe=model)
    assert torch.isfinite(loss) and {"cos", "soft", "hard", "clean/cos"} <= set(logs)
    assert -1.0 <= float(logs["repr/student_cosine"]) <= 1.0
    assert float(logs["repr/teacher_cosine"]) == pytest.approx(float(mean_pairwise_cosine(t_hidden[-1],
                                                                                           batch["attention_mask"])))


def test_mean_pairwise_cosine_reads_collapse():
    mask = torch.ones(3, 2)
    same = torch.ones(3, 2, 4)
    assert float(mean_pairwise_cosine(same, mask)) == pytest.approx(1.0)
    basis = torch.eye(4)[:3, None, :].expand(3, 2, 4)  # three orthogonal sentences
    assert float(mean_pairwise_cosine(basis, mask)) == pytest.approx(0.0)
    assert float(mean_pairwise_cosine(same[:1], mask[:1])) == 0.0


def test_bad_perturbation_settings_are_refused():
    with pytest.raises(UserError, match="--epsilon"):
        PerturbConfig(epsilon=0.0)
    with pytest.raises(UserError, match="--perturb_mode"):
        PerturbConfig(mode="both")


def test_add_mode_runs_the_student_twice_per_micro_batch():
    """The dry run's activation estimate counts the perturbed pass only where it is added."""
    assert PerturbConfig(mode="add").student_passes == 2
    assert PerturbConfig(mode="replace").student_passes == 1
    assert PerturbConfig(enabled=False, mode="add").student_passes == 1


def test_the_task_stage_perturbs_in_add_mode_and_general_distillation_as_the_paper():
    """The task stage's default is add (measured: docs/METHOD_NOTES.md); general distillation,
    unmeasured in add mode, keeps the paper's replace. Both refuse a bad mode by name."""
    from finetune.glue import GlueArgs
    from lrcbert.config import parse_args
    from pretrain.general_distill import PretrainArgs

    task = parse_args(GlueArgs, ["--task", "sst2", "--teacher", "t", "--output_dir", "o"])
    assert task.perturb_mode == "add" and task.perturbation.mode == "add"
    assert parse_args(GlueArgs, ["--task", "sst2", "--teacher", "t", "--output_dir", "o", "--perturb_mode",
                                 "replace"]).perturbation.mode == "replace"
    general = parse_args(PretrainArgs, ["--teacher", "t", "--corpus", "c", "--output_dir", "o"])
    assert general.perturb_mode == "replace"
    with pytest.raises(SystemExit):
        parse_args(GlueArgs, ["--task", "sst2", "--teacher", "t", "--output_dir", "o", "--perturb_mode", "both"])


def test_the_task_stage_perturbs_classification_but_not_regression_by_default():
    """Measured: every perturbation setting cost STS-B Pearson at small budgets, so the default
    is on for classification and off for regression; an explicit --perturb wins either way."""
    from finetune.glue import GlueArgs, effective_flags
    from lrcbert.config import parse_args

    def args(task, *extra):
        return parse_args(GlueArgs, ["--task", task, "--teacher", "t", "--output_dir", "o", *extra])

    assert args("sst2").perturb is True and args("cola").perturb is True and args("rte").perturb is True
    assert args("stsb").perturb is False and args("STS-B").perturbation.enabled is False
    assert args("stsb", "--perturb", "true").perturb is True and args("sst2", "--perturb", "false").perturb is False
    assert effective_flags(args("stsb")) == effective_flags(args("stsb", "--perturb", "false"))  # what args.json says
    with pytest.raises(UserError, match="unknown GLUE task"):
        args("nope")
    with pytest.raises(UserError, match="--perturb_mode replace has no effect: gradient perturbation is off"):
        args("stsb", "--perturb_mode", "replace")  # a knob for a perturbation that the default leaves off
    assert args("stsb", "--perturb_mode", "replace", "--perturb", "true").perturbation.mode == "replace"
    assert args("sst2", "--epsilon", "0.003").perturbation.epsilon == 0.003


def test_loss_schedule_flags_are_checked_before_training_and_reach_args_json():
    from finetune.glue import GlueArgs, effective_flags
    from lrcbert.config import parse_args

    def args(*extra):
        return parse_args(GlueArgs, ["--task", "cola", "--teacher", "t", "--output_dir", "o", *extra])

    assert args().prediction_ramp == 0.0
    assert effective_flags(args("--prediction_ramp", "0.25"))["prediction_ramp"] == 0.25
    with pytest.raises(UserError, match="--prediction_ramp must be in"):
        args("--prediction_ramp", "-0.1")
    # every flag of the loss schedule fails at parse time, before data, models or process groups
    with pytest.raises(UserError, match=r"--stage1_fraction must be in \[0, 1\] \(a fraction of the steps\), got 1.5"):
        args("--stage1_fraction", "1.5")
    with pytest.raises(UserError, match="--stage2_weights must be alpha:beta:gamma"):
        args("--stage2_weights", "1:3")
    with pytest.raises(UserError, match="--stage1_weights weights must be non-negative"):
        args("--stage1_weights", "1:-1:0")
    assert args().cos_nce_form == "paper" and effective_flags(args("--cos_nce_form", "centered"))["cos_nce_form"] == "centered"
    assert "cos_nce_form" not in effective_flags(args("--intermediate", "none"))  # inert without COS-NCE


# ---------------------------------------------------------------- per-rank dropout

def test_each_rank_draws_its_own_dropout():
    draws = []
    for rank in (0, 1, 0):
        run = Run()
        run.rank = rank
        run.seed_dropout(42)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


def test_add_mode_in_two_backward_passes_gives_the_three_pass_gradients():
    """Add mode with the parameters given: one backward of the clean loss yields dL/de and the
    clean gradients, which the returned loss carries into the engine's backward. The
    parameter gradients equal those of backpropagating L(e) + L(e') through both graphs."""
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0

    def grads_and_loss(params_given: bool, loss_scale: float = 1.0):
        torch.manual_seed(0)
        model = _student(dropout=0.2).train()
        torch.manual_seed(1)  # the same dropout masks in both runs

        def loss_of(forward, delta=None):
            logits, _, embeddings, _ = forward(ids, mask, None, delta)
            loss = logits.pow(2).mean()
            return loss, {"total": loss.detach()}, embeddings

        params = [p for p in model.parameters() if p.requires_grad] if params_given else None
        loss, logs = perturbed_loss(loss_of, model, model, 0.05, loss_scale, "add", attention_mask=mask,
                                    relative=True, params=params)
        (loss * loss_scale).backward()  # as the engine does: the loss scaled, then backward
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss, logs

    three, loss3, logs3 = grads_and_loss(False)
    two, loss2, logs2 = grads_and_loss(True)
    scaled, _, _ = grads_and_loss(True, loss_scale=128.0)
    assert torch.allclose(loss2, loss3) and torch.equal(logs2["clean/total"], logs3["clean/total"])
    assert set(two) == set(three) and len(two) > 10
    for name in three:
        assert torch.allclose(two[name], three[name], rtol=1e-4, atol=1e-6), name
        assert torch.allclose(scaled[name] / 128.0, three[name], rtol=1e-4, atol=1e-6), name
    # replace mode ignores the parameters: only the perturbed loss is trained
    replace = _replace_grads(ids, mask)
    assert set(replace) == set(two) and any(not torch.allclose(replace[n], two[n]) for n in two)


def _replace_grads(ids, mask):
    torch.manual_seed(0)
    model = _student(dropout=0.2).train()
    torch.manual_seed(1)

    def loss_of(forward, delta=None):
        logits, _, embeddings, _ = forward(ids, mask, None, delta)
        return logits.pow(2).mean(), {}, embeddings

    loss, _ = perturbed_loss(loss_of, model, model, 0.05, 1.0, "replace", attention_mask=mask, relative=True,
                             params=list(model.parameters()))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_resuming_with_another_perturbation_is_refused_and_the_card_says_which(tmp_path):
    """A run stopped while its default perturbed and resumed under today's default would be
    neither: the checkpoint's arguments decide, and the refusal names the flags to pass. The
    model card of a student trained without perturbation says so."""
    from dataclasses import asdict

    from finetune.glue import GlueArgs, check_same_perturbation
    from lrcbert.config import parse_args
    from lrcbert.model_card import write_model_card

    def args(*extra):
        return parse_args(GlueArgs, ["--task", "stsb", "--teacher", "t", "--output_dir", "o", *extra])

    saved = asdict(args("--perturb", "true"))  # as the checkpoint stores them
    with pytest.raises(UserError, match="--perturb true --epsilon 0.01 --epsilon_relative true --perturb_mode add"):
        check_same_perturbation(saved, args())
    check_same_perturbation(saved, args("--perturb", "true"))
    with pytest.raises(UserError, match="trained with --perturb false"):
        check_same_perturbation(asdict(args()), args("--perturb", "true"))
    check_same_perturbation(asdict(args("--stage", "teacher")), args("--stage", "teacher", "--perturb", "true"))

    card = write_model_card(str(tmp_path), title="t", recipe="r", command="c", teacher="T", parameters=10,
                            perturbed=False)
    assert "without gradient perturbation" in open(card).read()
