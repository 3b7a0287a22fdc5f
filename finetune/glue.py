"""Task distillation on GLUE with LRC-BERT (or, with ``--stage teacher``, teacher fine-tuning).

    deepspeed finetune/glue.py --ds_config ds_configs/z2.json --task sst2 \
        --data_dir GLUE/SST-2 --teacher TEACHER_DIR --output_dir runs/sst2

The loop is written out: setup -> train (teacher forward, negatives, the loss step with
gradient perturbation, backward, step) -> evaluate -> save.

SIGUSR1 or SIGTERM (from the first line of ``main``, start-up included): the current step
finishes, every rank checkpoints, ``OUTPUT_DIR/preempted`` is written and the process exits 0;
``--resume`` continues. A rank that dies makes the others exit with status 3 naming it; a
NaN/inf loss stops the run with an error naming the step and the examples of the micro-batch.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import KW_ONLY, asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lrcbert.config import flag, parse_args  # noqa: E402
from lrcbert.data import glue, glue_metrics  # noqa: E402
from lrcbert.data.batches import Encoded, TrainOrder, collate, encode, eval_shard  # noqa: E402
from lrcbert.data.text import load_tokenizer  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.flags import PERTURB_KNOBS, PERTURBATION_FLAGS, GlueStudentFlags, SharedFlags  # noqa: E402
from lrcbert.method.layer_map import format_layer_map, parse_layer_map  # noqa: E402
from lrcbert.method.losses import LossWeights, hard_loss  # noqa: E402
from lrcbert.method.negatives import negative_generator  # noqa: E402
from lrcbert.method.objective import INTERMEDIATE_LOSSES, LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.method.perturb import PERTURB_MODES  # noqa: E402
from lrcbert.method.schedule import (TwoStageSchedule, two_stage_lr, warmup_linear_decay,  # noqa: E402
                                     warmup_steps_from)
from lrcbert.models import (DistillStudent, build_student, check_positions, check_teacher_labels,  # noqa: E402
                            count_parameters, export_hf, init_regression_head, load_config, load_teacher,
                            student_config_for)
from lrcbert.model_card import command_line, write_model_card  # noqa: E402
from lrcbert.monitor import Monitor  # noqa: E402
from lrcbert.runtime.checkpoints import (check_output_dir, check_resumed_flags, resume_layout,  # noqa: E402
                                         resumed_micro_step)
from lrcbert.runtime.ds_config import (PRECISIONS, TrainerSettings, check_perturbation_supported,  # noqa: E402
                                       resolve_ds_config, zero_stage)
from lrcbert.runtime.engine import Engine, build_optimizer, check_precision_supported  # noqa: E402
from lrcbert.runtime import plan  # noqa: E402
from lrcbert.runtime.guards import check_finite_loss  # noqa: E402
from lrcbert.runtime.ranks import env_rank, env_world_size, rank_and_world  # noqa: E402
from lrcbert.runtime.run import Run, RunSettings  # noqa: E402


@dataclass
class GlueArgs(GlueStudentFlags, SharedFlags):
    """LRC-BERT task distillation on GLUE (default), or teacher fine-tuning (--stage teacher)."""

    teacher: str = flag("teacher: HF model dir or hub name (for --stage teacher: the pretrained encoder to fine-tune)")
    output_dir: str = flag("where model/, eval_results.json, checkpoints/, tensorboard/ go")
    stage: str = flag("distill: LRC-BERT student from a fine-tuned teacher; teacher: fine-tune the teacher",
                      "distill", choices=["distill", "teacher"])
    precision: str = flag("fp32, fp16 (dynamic loss scale) or bf16", "fp32", choices=PRECISIONS)
    micro_batch_size: int = flag("examples per rank per micro-step (paper: batch 16)", 16)
    num_epochs: float | None = flag("epochs; default from the task table "
                                    "(90 for datasets under 10k examples, 18 otherwise)", None)
    max_steps: int = flag("optimizer steps; overrides --num_epochs when > 0", -1)
    stage1_fraction: float = flag("fraction of steps in loss stage 1 (paper: 0.8; 0 = the stage-2 weights from the "
                                  "first step, measured better at small budgets: docs/METHOD_NOTES.md)", 0.0)
    stage1_weights: str = flag("alpha:beta:gamma in stage 1", "1:0:0")
    stage2_weights: str = flag("alpha:beta:gamma in stage 2", "1:1:3")
    prediction_ramp: float = flag("raise beta and gamma linearly from 0 over this fraction of stage 2's steps "
                                  "(alpha unchanged; not in the paper; 0 = off)", 0.0)
    intermediate: str = flag("intermediate-layer loss: cos_nce, mse (TinyBERT-style ablation) or none",
                             "cos_nce", choices=INTERMEDIATE_LOSSES)
    negatives: str = flag("negative source: other rows of the global batch", "batch", choices=["batch"])
    num_negatives: int = flag("K negatives per sample (capped at global batch - 1)", 15)
    teacher_gate: bool = flag("score the teacher on dev first and refuse one at chance level", True)
    gate_margin: float = flag("classification: the teacher must beat the best constant predictor by this much", 0.02)
    gate_min_correlation: float = flag("regression (STS-B): the teacher's dev Pearson must reach this", 0.5)
    lr_schedule: str = flag("per_stage: warm-up and linear decay within each loss stage (stage 2 trains the head "
                            "at the full rate); whole_run: one warm-up and decay over the run", "per_stage",
                            choices=["per_stage", "whole_run"])
    eval_steps: int = flag("evaluate on dev every N steps (0 = only at the end)", 0)
    save_steps: int = flag("checkpoint every N steps (0 = only at the end)", 500)
    resume: bool = flag("continue from OUTPUT_DIR/checkpoints/latest, at this or another world size (the global "
                        "batch is kept)", False)
    max_test_samples: int = flag("use the first N examples of each test split", -1)
    # the task stage's own default (general distillation keeps the paper's replace): in replace
    # mode the student never trains on a clean input, and at the README budget that cost STS-B
    # and CoLA (CoLA: a constant predictor); add steps on both losses (docs/METHOD_NOTES.md)
    _: KW_ONLY
    perturb_mode: str = flag("replace: train on L(e') only (the paper); add: L(e) + L(e'), the task-stage default",
                             "add", choices=PERTURB_MODES)
    # on a regression task (STS-B) every perturbation measured cost Pearson against none, on
    # both machines and every seed (docs/METHOD_NOTES.md): the default leaves it off there
    perturb: bool | None = flag("gradient perturbation on the student's embedding output; default: on, except "
                                "on regression tasks (STS-B)", None)

    def __post_init__(self):
        # the loss schedule's flags fail here, before any data, model or process group
        TwoStageSchedule.from_flags(0, self)
        if self.perturb is None:
            self.perturb = not glue.get_task(self.task).is_regression
            changed = [f"--{k} {getattr(self, k)}" for k in PERTURB_KNOBS
                       if getattr(self, k) != type(self).__dataclass_fields__[k].default]
            if changed and not self.perturb:  # e.g. one sweep's flags for every task: say it, do not ignore it
                raise UserError(f"{' '.join(changed)} has no effect: gradient perturbation is off by default on "
                                f"{self.task} (a regression task); pass --perturb true to perturb")
        super().__post_init__()


# flags that never change what a run trains or scores: where things go, logging, checkpoints,
# timeouts, and the pass/fail teacher gate
RUN_CONTROL = frozenset({
    "output_dir", "overwrite_output_dir", "resume", "stop_after_steps", "keep_checkpoints", "save_steps", "log_steps",
    "eval_steps", "eval_batch_size", "max_test_samples", "dist_timeout", "dry_run", "world_size", "ds_config",
    "teacher_gate", "gate_margin", "gate_min_correlation"})
# flags only the distillation reads: teacher fine-tuning ignores them
DISTILL_ONLY = frozenset({
    "student", "student_layers", "student_hidden", "student_intermediate", "student_heads", "pooling",
    *PERTURBATION_FLAGS, "layer_map", "stage1_fraction", "stage1_weights", "stage2_weights",
    "prediction_ramp", "intermediate", "cos_nce_form", "negatives", "num_negatives", "temperature", "lr_schedule"})


def check_same_perturbation(saved: dict, args: GlueArgs) -> None:
    """A resumed run must perturb as it did before the stop: the default depends on the task
    and has changed over time, so a command that resumes a run may no longer say what it
    trained with; the checkpoint's arguments do. UserError naming the flags to pass."""
    known = {k: v for k, v in saved.items() if k in GlueArgs.__dataclass_fields__}
    before = {k: v for k, v in effective_flags(GlueArgs(**known)).items() if k in PERTURBATION_FLAGS}
    now = {k: v for k, v in effective_flags(args).items() if k in PERTURBATION_FLAGS}
    check_resumed_flags(before, now)


def effective_flags(args: GlueArgs) -> dict:
    """The flags that decide what a run trains and scores, as ``args.json`` records them: run
    control is left out, and so is every flag this run's other settings make inert (the
    distillation flags in teacher fine-tuning, the perturbation's knobs with ``--perturb false``,
    the negatives with no COS-NCE, stage 1's weights with no stage 1). Runs with equal effective
    flags on the same data, teacher and student train the same way."""
    inert = set(RUN_CONTROL)
    if args.stage == "teacher":
        inert |= DISTILL_ONLY
    else:
        if not args.perturb:
            inert |= set(PERTURB_KNOBS)
        if args.intermediate != "cos_nce":
            inert |= {"pooling", "negatives", "num_negatives", "cos_nce_form"}
        if args.intermediate == "none":
            inert.add("layer_map")
        if args.stage1_fraction == 0:
            inert.add("stage1_weights")
    if args.max_steps > 0:
        inert.add("num_epochs")
    return {k: v for k, v in asdict(args).items() if k not in inert}


# ------------------------------------------------------------------------------------ setup

@dataclass
class Prepared:
    """What setup validated and train needs."""

    task: glue.TaskSpec
    ds_config: dict
    teacher_cfg: object
    student_cfg: object
    tokenizer: object
    layer_map: list
    encoded: dict[str, Encoded]
    order: TrainOrder
    total_steps: int
    sizes: dict[str, int]  # rows per split


def setup(args: GlueArgs) -> Prepared:
    """Everything that can fail on bad input, before any process group or model exists."""
    task = glue.get_task(args.task)
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir not found: {args.data_dir}")
    check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps must be positive (or -1: from --num_epochs), got {args.max_steps}")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    world = args.planned_world_size(env_world_size())
    elastic = resume_layout(args, world, 0 if args.dry_run else env_rank())
    settings = TrainerSettings(args.micro_batch_size, args.gradient_accumulation_steps, world,
                               args.max_grad_norm, args.precision)
    ds_config = resolve_ds_config(args.ds_config, settings)
    if elastic is not None:
        elastic.configure(ds_config)
    check_precision_supported(args.precision)
    if args.stage == "distill" and args.perturb:
        check_perturbation_supported(ds_config, args.ds_config)
    teacher_cfg = load_config(args.teacher, "teacher")
    tokenizer = load_tokenizer(args.teacher)
    if args.stage == "distill":
        check_teacher_labels(task, teacher_cfg, args.teacher)
        student_cfg = student_config_for(args.student, teacher_cfg, args.student_shape, tokenizer)
        layer_map = parse_layer_map(args.layer_map, student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)
    else:
        student_cfg, layer_map = teacher_cfg, []
    check_positions(args.max_seq_length, teacher=teacher_cfg, student=student_cfg)
    splits = {"train": glue.load_examples(task, args.data_dir, "train", args.max_train_samples)}
    for split in task.dev_splits:
        splits[split] = glue.load_examples(task, args.data_dir, split, args.max_eval_samples)
    for split in glue.available_splits(task, args.data_dir) if args.data_dir else []:
        if split not in splits and split != "train":
            splits[split] = glue.load_examples(task, args.data_dir, split, args.max_test_samples)
    order = TrainOrder(len(splits["train"]), args.micro_batch_size, world, 0 if args.dry_run else env_rank(),
                       args.gradient_accumulation_steps, args.seed)
    if order.steps_per_epoch < 1:
        raise UserError(f"{len(splits['train'])} training examples do not fill one global batch of "
                        f"{settings.global_batch_size} (micro {args.micro_batch_size} x accumulation "
                        f"{args.gradient_accumulation_steps} x world {world})")
    epochs = args.num_epochs if args.num_epochs is not None else task.default_epochs
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(epochs * order.steps_per_epoch))
    sizes = {name: len(ex) for name, ex in splits.items()}
    encoded = None if args.dry_run else {  # a dry run counts rows and tokenizes nothing
        name: encode(tokenizer, ex.text_a, ex.text_b, ex.labels, ex.index, args.max_seq_length)
        for name, ex in splits.items()}
    return Prepared(task, ds_config, teacher_cfg, student_cfg, tokenizer, layer_map, encoded, order, total_steps,
                    sizes)


# ------------------------------------------------------------------------------------ evaluate

@torch.no_grad()
def predict(forward, data: Encoded, batch_size: int, pad_id: int, device) -> np.ndarray:
    """Logits for every row of ``data`` (on every rank): ranks score disjoint shards."""
    rank, world = rank_and_world()
    rows, outs = [], []
    for shard in eval_shard(len(data), batch_size, rank, world):
        batch = collate(data, shard, pad_id)
        logits = forward({k: v.to(device) for k, v in batch.items() if k != "labels"})
        rows.append(batch["rows"])
        outs.append(logits.float().cpu())
    gathered = [(torch.cat(rows), torch.cat(outs))]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (torch.cat(rows), torch.cat(outs)))
    result = {row: logit for r, o in gathered for row, logit in zip(r.tolist(), o)}
    return torch.stack([result[i] for i in range(len(data))]).numpy()


def predictions(task, forward, data: Encoded, args: GlueArgs, pad_id: int, device) -> np.ndarray:
    logits = predict(forward, data, args.eval_batch_size, pad_id, device)
    return logits.reshape(-1) if task.is_regression else logits.argmax(-1)


def evaluate(task, forward, encoded, args, pad_id, device) -> dict[str, dict[str, float]]:
    """Each dev split's metrics under their official names."""
    return {split: glue_metrics.compute_metrics(task, predictions(task, forward, encoded[split], args, pad_id, device),
                                                np.asarray(encoded[split].labels))
            for split in task.dev_splits}


def write_test_predictions(run: Run, task, forward, encoded, args, pad_id) -> list[str]:
    """Leaderboard files for every test split present (rank 0 writes them)."""
    written = []
    for split in (s for s in encoded if s != "train" and s not in task.dev_splits):
        preds = predictions(task, forward, encoded[split], args, pad_id, run.device)
        if run.is_main:
            path = glue_metrics.write_submission(task, split, encoded[split].index, preds,
                                                 os.path.join(args.output_dir, "submission"))
            written.append(str(path))
    return written


def gate_teacher(run: Run, task, teacher, encoded, args, pad_id) -> dict:
    """The teacher's dev metrics; a teacher no better than a constant predictor is refused."""
    forward = lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],  # noqa: E731
                                token_type_ids=b["token_type_ids"]).logits
    results = evaluate(task, forward, encoded, args, pad_id, run.device)
    first = task.dev_splits[0]
    score = results[first][task.primary_metric]
    chance = glue_metrics.chance_score(task, np.asarray(encoded[first].labels))
    floor = args.gate_min_correlation if task.is_regression else chance + args.gate_margin
    if run.is_main:
        print(f"teacher on {first}: {task.primary_metric} {score:.4f} (best constant predictor {chance:.4f}, "
              f"gate {floor:.4f})")
    if args.teacher_gate and score < floor:
        why = (f"below --gate_min_correlation {floor:.4f}" if task.is_regression
               else f"no better than a constant predictor ({chance:.4f})")
        raise UserError(f"teacher {args.teacher} scores {task.primary_metric} {score:.4f} on {first}, {why}: "
                        f"is it fine-tuned for {task.name}? (--teacher_gate false to override)")
    return results


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    with Run() as run:  # first: a signal during start-up must not kill the job
        args = parse_args(GlueArgs, argv)
        prepared = setup(args)
        if args.dry_run:
            print(plan.describe(dry_run_plan(args, prepared)), flush=True)
        else:
            train(run, args, prepared)
    return run.exit_status


def dry_run_plan(args: GlueArgs, p: Prepared) -> plan.Plan:
    distill = args.stage == "distill"
    world = args.planned_world_size(env_world_size())
    if distill:  # the student with its task head, plus the projections
        trained = plan.trained_parameters(p.student_cfg, True, len(p.layer_map), p.teacher_cfg.hidden_size)
        teacher = plan.count_on_meta(p.teacher_cfg, with_head=True)
        layer_text = format_layer_map(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size)
    else:
        trained, teacher, layer_text = plan.count_on_meta(p.teacher_cfg, with_head=True), 0, ""
    epochs = p.total_steps / p.order.steps_per_epoch
    evals = ", ".join(f"{name} {n:,}" for name, n in p.sizes.items() if name != "train")
    result = plan.Plan.for_run(
        f"finetune/glue.py ({'task distillation' if distill else 'teacher fine-tuning'}, {p.task.name})",
        args, world, p.total_steps, p.ds_config, layer_map_text=layer_text, trained_parameters=trained,
        teacher_parameters=teacher,
        data_text=f"{epochs:.2f} epochs of {p.sizes['train']:,} training examples ({p.order.steps_per_epoch:,} "
                  f"steps per epoch); evaluation rows: {evals or 'none'}")
    width = p.teacher_cfg.hidden_size
    negatives_dim = width * (args.max_seq_length if args.pooling == "flatten" else 1)
    activations = plan.activation_bytes(
        p.student_cfg if distill else p.teacher_cfg, p.teacher_cfg if distill else None, args.micro_batch_size,
        args.max_seq_length, args.precision, len(p.layer_map), negatives_dim if distill else 0,
        args.micro_batch_size * world, args.perturbation.student_passes if distill else 1)
    plan.estimate_memory(result, activations)
    return result


def train(run: Run, args: GlueArgs, p: Prepared) -> None:
    run.start(RunSettings.from_flags(args, p.total_steps))
    task, distill = p.task, args.stage == "distill"
    label_names = None if task.is_regression else list(task.label_names)
    pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0

    # ---- models: the teacher is gated on dev before any training
    teacher = load_teacher(args.teacher, task_head=True, device=run.device) if distill else None
    student_hf = build_student(p.student_cfg, path=args.student if distill else args.teacher, task_head=True,
                               label_names=label_names)
    if task.is_regression:  # a new head: start at the label median (robust to a bad label), not 0
        init_regression_head(student_hf, float(np.median(p.encoded["train"].labels)))
    mapped = [s for s, _ in p.layer_map] if args.intermediate != "none" else []
    module = DistillStudent(student_hf, mapped, p.teacher_cfg.hidden_size)
    if run.is_main:
        role = "LRC-BERT distillation" if distill else "teacher fine-tuning"
        print(f"{role} on {task.name}: {len(p.encoded['train'])} training examples, {p.total_steps} steps, "
              f"global batch {p.ds_config['train_batch_size']}, world {run.world}, {args.precision}, "
              f"ZeRO-{zero_stage(p.ds_config)}")
        print(f"student: {count_parameters(student_hf) / 1e6:.1f}M parameters")
        if p.layer_map:
            print(format_layer_map(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size))
    teacher_results = gate_teacher(run, task, teacher, p.encoded, args, pad_id) if distill else None

    # ---- engine
    schedule = TwoStageSchedule.from_flags(p.total_steps, args)
    optimizer = build_optimizer(module, args.learning_rate, args.weight_decay)
    if distill and args.lr_schedule == "per_stage":
        lr_schedule = two_stage_lr(args.warmup, p.total_steps, schedule.stage2_start)
    else:
        lr_schedule = warmup_linear_decay(warmup_steps_from(args.warmup, p.total_steps), p.total_steps)
    engine = Engine(module, optimizer, lr_schedule, p.ds_config)
    whole_parameters = engine.whole_parameters  # add-mode perturbation: two backward passes, not three
    run.seed_dropout(args.seed)
    micro_step = 0
    if args.resume:
        # a global batch is a fixed span of the epoch's permutation whatever the layout: only the count converts
        saved = run.resume(engine, check=lambda state: check_same_perturbation(state["args"], args))
        micro_step = resumed_micro_step(saved, args.gradient_accumulation_steps)
        if run.is_main:
            print(f"resumed from step {engine.global_steps} ({micro_step} micro-batches consumed)")

    objective = LRCObjective(p.layer_map, ObjectiveConfig(args.pooling, args.intermediate, args.num_negatives,
                                                          args.temperature, task.is_regression, args.cos_nce_form))
    monitor = Monitor(os.path.join(args.output_dir, "tensorboard"), p.total_steps, engine.global_steps, run.is_main,
                      desc=f"{args.stage} {task.name}")
    student_fwd = lambda b: engine(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]  # noqa: E731

    def save(step: int) -> None:
        state = {"micro_step": micro_step, "args": asdict(args), "task": task.name, "total_steps": p.total_steps}
        run.save(engine, step, state, args.keep_checkpoints)

    # ---- train
    engine.train()
    while engine.global_steps < p.total_steps:
        step = engine.global_steps
        weights = schedule.weights(step) if distill else LossWeights(0.0, 0.0, 1.0)
        rows = p.order.rows(micro_step)
        batch = {k: v.to(run.device) for k, v in collate(p.encoded["train"], rows, pad_id, task.is_regression).items()}
        if distill:
            t = objective.teacher(teacher, batch)
            negatives = (objective.batch_negatives(t.vectors, negative_generator(args.seed, step))
                         if objective.uses_cos_nce and weights.alpha > 0 else None)
            loss, logs = objective.step(engine, batch, t, weights, negatives, perturb=args.perturbation,
                                        probe=engine.module, loss_scale=engine.loss_scale,
                                        params=whole_parameters)
        else:
            logits = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0]
            loss = hard_loss(logits, batch["labels"], task.is_regression)
            logs = {"hard": loss.detach(), "total": loss.detach()}  # same keys on every rank
        check_finite_loss(loss, step, micro_step, lambda: [p.encoded["train"].index[r] for r in rows.tolist()],
                          what=f"{task.glue_name} train examples (index)")
        engine.backward(loss)
        engine.step()
        micro_step += 1
        monitor.accumulate(logs, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))
        if micro_step % args.gradient_accumulation_steps:
            continue
        done = engine.global_steps
        monitor.advance({"loss": float(logs["total"])})
        if done % args.log_steps == 0 or done == p.total_steps:
            monitor.log(done, {"schedule/alpha": weights.alpha, "schedule/beta": weights.beta,
                               "schedule/gamma": weights.gamma, "schedule/stage": float(schedule.stage(step)),
                               "train/lr": engine.lr, "train/loss_scale": engine.loss_scale,
                               "train/skipped_steps": float(engine.skipped_steps),
                               "train/epoch": micro_step / p.order.micro_batches_per_epoch})
        if args.eval_steps > 0 and done % args.eval_steps == 0 and done < p.total_steps:
            engine.eval()
            for split, metrics in evaluate(task, student_fwd, p.encoded, args, pad_id, run.device).items():
                for name, value in metrics.items():
                    monitor.scalar(f"eval/{split}/{name}", value, done)
            engine.train()
        stopping = run.should_stop(done)
        if run.checkpoint_due(done, stopping):
            save(done)
        if stopping:
            return run.leave(done, monitor)

    # ---- evaluate and save
    engine.eval()
    results = evaluate(task, student_fwd, p.encoded, args, pad_id, run.device)
    save(engine.global_steps)
    state = engine.full_state_dict()
    submissions = write_test_predictions(run, task, student_fwd, p.encoded, args, pad_id)
    if run.is_main:
        export_hf(state, "model.", student_hf.config, p.tokenizer, os.path.join(args.output_dir, "model"))
        shape = student_hf.config
        what = "LRC-BERT task distillation" if distill else "Teacher fine-tuning (cross-entropy)"
        write_model_card(os.path.join(args.output_dir, "model"),
                         title=f"{'LRC-BERT student' if distill else 'Teacher'} for GLUE {task.glue_name}",
                         recipe=f"{what} on GLUE {task.glue_name}: {engine.global_steps} optimizer steps, global "
                                f"batch {p.ds_config['train_batch_size']}, peak learning rate {args.learning_rate} "
                                f"({args.lr_schedule if distill else 'whole_run'} schedule), max_seq_length "
                                f"{args.max_seq_length}, {args.precision}; model {shape.num_hidden_layers} layers x "
                                f"{shape.hidden_size} hidden; intermediate loss {args.intermediate}, gradient "
                                f"perturbation {f'{args.perturb_mode}, epsilon {args.epsilon}' if args.perturb else 'off'}.",
                         command=command_line("finetune/glue.py"), teacher=args.teacher,
                         parameters=count_parameters(student_hf), task=task, results=results, distilled=distill,
                         perturbed=args.perturb)
        payload = {"task": task.name, "stage": args.stage, "steps": engine.global_steps, **results}
        if teacher_results is not None:
            payload["teacher"] = teacher_results
        run.write_json("eval_results.json", payload)
        run.write_json("args.json", asdict(args))
        for split, metrics in results.items():
            for name, value in metrics.items():
                monitor.scalar(f"eval/{split}/{name}", value, engine.global_steps)
        print(json.dumps({"eval": results, "submission_files": submissions}))
    run.finish(monitor)


if __name__ == "__main__":
    sys.exit(main())
