"""Task distillation on GLUE with LRC-BERT (or, with ``--stage teacher``, teacher fine-tuning).

    deepspeed finetune/glue.py --ds_config ds_configs/z2.json --task sst2 \
        --data_dir GLUE/SST-2 --teacher TEACHER_DIR --output_dir runs/sst2

The loop is written out: setup -> train (teacher forward, clean student pass,
gradient perturbation, perturbed pass, backward, step) -> evaluate -> save.

SIGUSR1 or SIGTERM (from the first line of ``main``, start-up included): the current step
finishes, every rank checkpoints, ``OUTPUT_DIR/preempted`` is written and the process exits 0;
``--resume`` continues. A rank that dies makes the others exit with status 3 naming it; a
NaN/inf loss stops the run with an error naming the step and the examples of the micro-batch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lrcbert import engine as eng  # noqa: E402
from lrcbert import glue_tasks  # noqa: E402
from lrcbert.batches import TrainOrder, collate, encode, eval_shard  # noqa: E402
from lrcbert.config import parse_args  # noqa: E402
from lrcbert.distill import INTERMEDIATE_LOSSES, LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.flags import SharedFlags  # noqa: E402
from lrcbert.layer_map import format_layer_map, parse_layer_map  # noqa: E402
from lrcbert.losses import LossWeights, hard_loss  # noqa: E402
from lrcbert.models import (DistillStudent, StudentShape, count_parameters, export_hf, freeze,  # noqa: E402
                            load_classifier, load_config, load_tokenizer, student_config, teacher_forward,
                            with_labels)
from lrcbert.monitor import Monitor  # noqa: E402
from lrcbert.negatives import negative_generator  # noqa: E402
from lrcbert.perturb import perturbed_loss  # noqa: E402
from lrcbert.schedule import TwoStageSchedule, parse_weights, warmup_linear_decay, warmup_steps_from  # noqa: E402


@dataclass
class GlueArgs(SharedFlags):
    """LRC-BERT task distillation on GLUE (default), or teacher fine-tuning (--stage teacher)."""

    task: str = field(metadata={"help": "GLUE task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"})
    teacher: str = field(metadata={"help": "teacher: HF model dir or hub name (for --stage teacher: the pretrained encoder to fine-tune)"})
    output_dir: str = field(metadata={"help": "where model/, eval_results.json, checkpoints/, tensorboard/ go"})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE task folder with the original train/dev/test TSV files; without it the task comes from the hub via datasets"})
    student: str | None = field(default=None, metadata={"help": "student HF dir (e.g. a general-distilled student); default: a fresh student of --student_* shape with the teacher's vocabulary"})
    stage: str = field(default="distill", metadata={"help": "distill: LRC-BERT student from a fine-tuned teacher; teacher: fine-tune the teacher", "choices": ["distill", "teacher"]})
    precision: str = field(default="fp32", metadata={"help": "fp32, fp16 (dynamic loss scale) or bf16", "choices": list(eng.PRECISIONS)})
    micro_batch_size: int = field(default=16, metadata={"help": "examples per rank per micro-step (paper: batch 16)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (paper sweeps 5e-5, 1e-4, 3e-4)"})
    warmup: float = field(default=0.1, metadata={"help": "warm-up: a fraction of the steps if < 1, else a step count"})
    num_epochs: float | None = field(default=None, metadata={"help": "epochs; default from the task table (90 for datasets under 10k examples, 18 otherwise)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides --num_epochs when > 0"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example, special tokens included"})
    temperature: float = field(default=1.1, metadata={"help": "soft-loss temperature t"})
    stage1_fraction: float = field(default=0.8, metadata={"help": "fraction of steps in loss stage 1 (0 = no two-stage schedule)"})
    stage1_weights: str = field(default="1:0:0", metadata={"help": "alpha:beta:gamma in stage 1"})
    stage2_weights: str = field(default="1:1:3", metadata={"help": "alpha:beta:gamma in stage 2"})
    intermediate: str = field(default="cos_nce", metadata={"help": "intermediate-layer loss: cos_nce, mse (TinyBERT-style ablation) or none", "choices": list(INTERMEDIATE_LOSSES)})
    negatives: str = field(default="batch", metadata={"help": "negative source: other rows of the global batch", "choices": ["batch"]})
    num_negatives: int = field(default=15, metadata={"help": "K negatives per sample (capped at global batch - 1)"})
    teacher_gate: bool = field(default=True, metadata={"help": "score the teacher on dev first and refuse one at chance level"})
    gate_margin: float = field(default=0.02, metadata={"help": "the teacher must beat the best constant predictor by this much"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate on dev every N steps (0 = only at the end)"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT_DIR/checkpoints/latest"})
    max_train_samples: int = field(default=-1, metadata={"help": "use the first N training examples (debugging, small runs)"})
    max_eval_samples: int = field(default=-1, metadata={"help": "use the first N examples of each dev split"})
    max_test_samples: int = field(default=-1, metadata={"help": "use the first N examples of each test split"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per rank per evaluation batch"})


# ------------------------------------------------------------------------------------ setup

def check_teacher_labels(task, config, path: str) -> None:
    """The teacher must predict this task's labels in this task's order."""
    wanted = 1 if task.is_regression else task.num_labels
    if config.num_labels != wanted:
        raise UserError(f"teacher {path} has {config.num_labels} labels but {task.name} needs {wanted}; "
                        "fine-tune a teacher for this task first (--stage teacher)")
    if task.is_regression:
        return
    names = [str(config.id2label[i]).lower() for i in range(config.num_labels)]
    if all(n.startswith("label_") for n in names):
        return  # generic names: the order cannot be checked
    if names != [n.lower() for n in task.label_names]:
        raise UserError(f"teacher {path} label order {names} differs from {task.name}'s "
                        f"{[n.lower() for n in task.label_names]}; its logits would be misread")


def load_examples(args: GlueArgs, task, split: str, limit: int):
    if args.data_dir:
        ex = glue_tasks.read_split(task, args.data_dir, split)
    else:
        ex = glue_tasks.load_hub_split(task, split)
    if 0 < limit < len(ex):
        ex = glue_tasks.Examples(ex.text_a[:limit], ex.text_b[:limit] if ex.text_b is not None else None,
                                 ex.labels[:limit] if ex.labels is not None else None, ex.index[:limit])
    return ex


def setup(args: GlueArgs):
    """Everything that can fail on bad input, before any process group or model exists."""
    task = glue_tasks.get_task(args.task)
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir not found: {args.data_dir}")
    eng.check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    for name in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    world = eng.env_world_size()
    settings = eng.TrainerSettings(args.micro_batch_size, args.gradient_accumulation_steps, world,
                                   args.max_grad_norm, args.precision)
    ds_config = eng.resolve_ds_config(args.ds_config, settings)
    eng.check_precision_supported(args.precision)
    if args.resume:  # the data position is a per-rank micro-step count: only the saving world size continues it
        eng.check_resume(os.path.join(args.output_dir, "checkpoints"), world, reshardable=False)
    if args.stage == "distill" and args.perturb and ds_config["zero_optimization"].get("stage", 0) == 3:
        raise UserError(f"{args.ds_config}: gradient perturbation needs dL/de, which ZeRO-3's module hooks hide "
                        "from autograd in this DeepSpeed version; use ZeRO-1/2 (ds_configs/z2.json) or --perturb false")
    teacher_cfg = load_config(args.teacher, "teacher")
    tokenizer = load_tokenizer(args.teacher)
    if args.stage == "distill":
        check_teacher_labels(task, teacher_cfg, args.teacher)
        if args.student:
            scfg = load_config(args.student, "student")
        else:
            scfg = student_config(teacher_cfg, StudentShape(args.student_layers, args.student_hidden,
                                                            args.student_intermediate, args.student_heads))
        if scfg.vocab_size != teacher_cfg.vocab_size or len(tokenizer) > scfg.vocab_size:
            raise UserError(f"student vocabulary ({scfg.vocab_size}) does not match the teacher's "
                            f"({teacher_cfg.vocab_size}, tokenizer {len(tokenizer)})")
        layer_map = parse_layer_map(args.layer_map, scfg.num_hidden_layers, teacher_cfg.num_hidden_layers)
    else:
        scfg, layer_map = teacher_cfg, []
    splits = {"train": load_examples(args, task, "train", args.max_train_samples)}
    for split in task.dev_splits:
        splits[split] = load_examples(args, task, split, args.max_eval_samples)
    if args.data_dir:
        for split in glue_tasks.available_splits(task, args.data_dir):
            if split not in splits and split != "train":
                splits[split] = load_examples(args, task, split, args.max_test_samples)
    encoded = {name: encode(tokenizer, ex.text_a, ex.text_b, ex.labels, ex.index, args.max_seq_length)
               for name, ex in splits.items()}
    order = TrainOrder(len(encoded["train"]), args.micro_batch_size, world, eng.env_rank(),
                       args.gradient_accumulation_steps, args.seed)
    if order.steps_per_epoch < 1:
        raise UserError(f"{len(encoded['train'])} training examples do not fill one global batch of "
                        f"{settings.global_batch_size} (micro {args.micro_batch_size} x accumulation "
                        f"{args.gradient_accumulation_steps} x world {world})")
    epochs = args.num_epochs if args.num_epochs is not None else task.default_epochs
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(epochs * order.steps_per_epoch))
    return task, ds_config, teacher_cfg, scfg, tokenizer, layer_map, encoded, order, total_steps


# ------------------------------------------------------------------------------------ evaluate

@torch.no_grad()
def predict(forward, data, batch_size: int, pad_id: int, device) -> np.ndarray:
    """Logits for every row of ``data`` (on every rank): ranks score disjoint shards."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows, outs = [], []
    for shard in eval_shard(len(data), batch_size, rank, world):
        batch = collate(data, shard, pad_id)
        logits = forward({k: v.to(device) for k, v in batch.items() if k != "labels"})
        rows.append(batch["rows"])
        outs.append(logits.float().cpu())
    local = (torch.cat(rows), torch.cat(outs))
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    result = {}
    for r, o in gathered:
        for row, logit in zip(r.tolist(), o):
            result[row] = logit
    return torch.stack([result[i] for i in range(len(data))]).numpy()


def to_predictions(task, logits: np.ndarray) -> np.ndarray:
    return logits.reshape(-1) if task.is_regression else logits.argmax(-1)


def evaluate(task, forward, encoded, args, pad_id, device) -> dict[str, dict[str, float]]:
    results = {}
    for split in task.dev_splits:
        data = encoded[split]
        preds = to_predictions(task, predict(forward, data, args.eval_batch_size, pad_id, device))
        results[split] = glue_tasks.compute_metrics(task, preds, np.asarray(data.labels))
    return results


def write_test_predictions(task, forward, encoded, args, pad_id, device) -> list[str]:
    written = []
    for split in encoded:
        if split == "train" or split in task.dev_splits:
            continue
        data = encoded[split]
        preds = to_predictions(task, predict(forward, data, args.eval_batch_size, pad_id, device))
        if eng.is_main():
            written.append(str(glue_tasks.write_submission(task, split, data.index, preds,
                                                           os.path.join(args.output_dir, "submission"))))
    return written


# ------------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    with eng.Preemption() as preemption:  # first: a signal during start-up must not kill the job
        args = parse_args(GlueArgs, argv)
        try:
            prepared = setup(args)
        except UserError as exc:
            if eng.env_rank() == 0:
                eng.print_error(str(exc))
            return 2
        return eng.run_training(train, args, *prepared, preemption=preemption)


def train(args, task, ds_config, teacher_cfg, scfg, tokenizer, layer_map, encoded, order, total_steps, *,
          preemption: eng.Preemption, guards: dict):
    eng.init_distributed(args.dist_timeout)
    rank = dist.get_rank()
    device = eng.device()
    main_rank = eng.is_main()
    out = args.output_dir
    if main_rank and args.overwrite_output_dir and not args.resume and os.path.isdir(out):
        shutil.rmtree(out)
    eng.barrier()
    if main_rank:
        os.makedirs(out, exist_ok=True)
    guards["watchdog"] = eng.Watchdog.start_all(out, args.dist_timeout)
    eng.seed_everything(args.seed)
    label_names = None if task.is_regression else list(task.label_names)
    regression = task.is_regression
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ---- models
    teacher = None
    if args.stage == "distill":
        teacher = freeze(load_classifier(args.teacher, label_names)).to(device)
        student_hf = (load_classifier(args.student, label_names, init_head=True) if args.student
                      else _fresh_student(scfg, label_names))
        mapped = [s for s, _ in layer_map] if args.intermediate != "none" else []
        module = DistillStudent(student_hf, mapped, teacher_cfg.hidden_size)
        export_cfg = student_hf.config
    else:
        student_hf = load_classifier(args.teacher, label_names, init_head=True)
        module = DistillStudent(student_hf, [], 0)
        export_cfg = student_hf.config
    if main_rank:
        role = "teacher fine-tuning" if args.stage == "teacher" else "LRC-BERT distillation"
        print(f"{role} on {task.name}: {len(encoded['train'])} training examples, {total_steps} steps, "
              f"global batch {ds_config['train_batch_size']}, world {dist.get_world_size()}, {args.precision}, "
              f"ZeRO-{ds_config.get('zero_optimization', {}).get('stage', 0)}")
        print(f"student: {count_parameters(student_hf) / 1e6:.1f}M parameters")
        if layer_map:
            print(format_layer_map(layer_map, scfg.hidden_size, teacher_cfg.hidden_size))

    # ---- teacher gate: a teacher at chance level is refused before any training
    teacher_results = None
    if teacher is not None:
        teacher_fwd = lambda b: teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"],  # noqa: E731
                                        token_type_ids=b["token_type_ids"]).logits
        teacher_results = evaluate(task, teacher_fwd, encoded, args, pad_id, device)
        first = task.dev_splits[0]
        score = teacher_results[first][task.primary_metric]
        chance = glue_tasks.chance_score(task, np.asarray(encoded[first].labels))
        if main_rank:
            print(f"teacher on {first}: {task.primary_metric} {score:.4f} (best constant predictor {chance:.4f})")
        if args.teacher_gate and score < chance + args.gate_margin:
            raise UserError(f"teacher {args.teacher} scores {task.primary_metric} {score:.4f} on {first}, "
                            f"no better than a constant predictor ({chance:.4f}): is it fine-tuned for "
                            f"{task.name}? (--teacher_gate false to override)")

    # ---- engine
    warmup_steps = warmup_steps_from(args.warmup, total_steps)
    optimizer = eng.build_optimizer(module, args.learning_rate, args.weight_decay)
    engine = eng.Engine(module, optimizer, warmup_linear_decay(warmup_steps, total_steps), ds_config)
    ckpt_dir = os.path.join(out, "checkpoints")
    micro_step = 0
    if args.resume:
        state = engine.load(ckpt_dir)
        micro_step = int(state["micro_step"])
        if main_rank:
            print(f"resumed from step {engine.global_steps} ({micro_step} micro-batches consumed)")
            eng.Preemption.clear_mark(out)

    schedule = TwoStageSchedule(total_steps, args.stage1_fraction, parse_weights(args.stage1_weights, "--stage1_weights"),
                                parse_weights(args.stage2_weights, "--stage2_weights"))
    objective = LRCObjective(layer_map, ObjectiveConfig(args.pooling, args.intermediate, args.num_negatives,
                                                        args.temperature, regression))
    monitor = Monitor(os.path.join(out, "tensorboard"), total_steps, engine.global_steps, main_rank,
                      desc=f"{args.stage} {task.name}")
    student_fwd = lambda b: engine(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]  # noqa: E731

    def client_state():
        return {"micro_step": micro_step, "args": asdict(args), "task": task.name, "total_steps": total_steps}

    # ---- train
    engine.train()
    while engine.global_steps < total_steps:
        step = engine.global_steps
        weights = schedule.weights(step) if args.stage == "distill" else LossWeights(0.0, 0.0, 1.0)
        batch = {k: v.to(device) for k, v in collate(encoded["train"], order.rows(micro_step), pad_id,
                                                        regression).items()}
        if args.stage == "teacher":
            logits, _, _, _ = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            loss = hard_loss(logits, batch["labels"], regression)
            logs = {"hard": loss.detach(), "total": loss.detach()}  # same keys on every rank
        else:
            loss, logs = distill_loss(args, engine, objective, teacher, batch, weights, rank, step)
        eng.check_finite_loss(loss, step, micro_step,
                              lambda: [encoded["train"].index[r] for r in batch["rows"].tolist()],
                              what=f"{task.glue_name} train examples (index)")
        engine.backward(loss)
        engine.step()
        micro_step += 1
        monitor.accumulate(logs, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))
        if micro_step % args.gradient_accumulation_steps:
            continue
        done = engine.global_steps
        monitor.advance({"loss": float(logs["total"])})
        if done % args.log_steps == 0 or done == total_steps:
            monitor.log(done, {"schedule/alpha": weights.alpha, "schedule/beta": weights.beta,
                               "schedule/gamma": weights.gamma, "schedule/stage": float(schedule.stage(step)),
                               "train/lr": engine.lr, "train/loss_scale": engine.loss_scale,
                               "train/skipped_steps": float(engine.skipped_steps),
                               "train/epoch": micro_step / order.micro_batches_per_epoch})
        if args.eval_steps > 0 and done % args.eval_steps == 0 and done < total_steps:
            engine.eval()
            for split, metrics in evaluate(task, student_fwd, encoded, args, pad_id, device).items():
                for name, value in metrics.items():
                    monitor.scalar(f"eval/{split}/{name}", value, done)
            engine.train()
        if args.save_steps > 0 and done % args.save_steps == 0 and done < total_steps:
            engine.save(ckpt_dir, done, client_state(), args.keep_checkpoints)
        stop = 0 < args.stop_after_steps <= done < total_steps
        preempted = preemption.agreed(device) and done < total_steps
        if stop or preempted:
            if args.save_steps <= 0 or done % args.save_steps:
                engine.save(ckpt_dir, done, client_state(), args.keep_checkpoints)
            if main_rank:
                if preempted:
                    eng.Preemption.mark(out, done, total_steps)
                print(f"{'preempted' if preempted else 'stopped'} after step {done} of {total_steps}; "
                      "continue with --resume")
            monitor.close()
            guards["watchdog"].stop()  # the ranks now leave at slightly different times
            eng.barrier()
            return

    # ---- evaluate and save
    engine.eval()
    results = evaluate(task, student_fwd, encoded, args, pad_id, device)
    engine.save(ckpt_dir, engine.global_steps, client_state(), args.keep_checkpoints)
    state = engine.full_state_dict()
    submissions = write_test_predictions(task, student_fwd, encoded, args, pad_id, device)
    if main_rank:
        export_hf(state, "model.", export_cfg, tokenizer, os.path.join(out, "model"))
        payload = {"task": task.name, "stage": args.stage, "steps": engine.global_steps, **results}
        if teacher_results is not None:
            payload["teacher"] = teacher_results
        with open(os.path.join(out, "eval_results.json"), "w") as f:
            json.dump(payload, f, indent=2)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        for split, metrics in results.items():
            for name, value in metrics.items():
                monitor.scalar(f"eval/{split}/{name}", value, engine.global_steps)
        print(json.dumps({"eval": results, "submission_files": submissions}))
    monitor.close()
    guards["watchdog"].stop()
    eng.barrier()


def _fresh_student(scfg, label_names):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(with_labels(scfg, label_names))


def distill_loss(args, engine, objective, teacher, batch, weights, rank, step):
    """One LRC-BERT micro-step: teacher once, the student twice with perturbation."""
    t_logits, t_hidden = teacher_forward(teacher, batch)
    mask = batch["attention_mask"]
    use_inter = args.intermediate != "none" and weights.alpha > 0
    t_vectors = negatives = None
    if use_inter and args.intermediate == "cos_nce":
        t_vectors = objective.teacher_vectors(t_hidden, mask)
        negatives = objective.batch_negatives(t_vectors, negative_generator(args.seed, step, rank))

    def loss_of(forward=engine, delta=None):
        s_logits, _, s_embed, projected = forward(batch["input_ids"], mask, batch["token_type_ids"], delta)
        total, logs = objective(weights, mask, projected, t_hidden, t_vectors, negatives,
                                s_logits, t_logits, batch["labels"])
        return total, logs, s_embed

    if not args.perturb:
        return loss_of()[:2]
    return perturbed_loss(loss_of, engine, engine.module, args.epsilon, engine.loss_scale, args.perturb_mode)

if __name__ == "__main__":
    sys.exit(main())
