"""External baseline: TinyBERT-style task distillation with TextBrewer's distiller.

    python bench/textbrewer_baseline.py --finetuned_teacher DIR --task sst2 \
        --data_dir ../shared/data/GLUE/SST-2 --output_dir OUT --max_steps 400 \
        --train_batch_size 16 --learning_rate 3e-4 --seed 1

This script is our driver of TextBrewer's ``GeneralDistiller`` (the ``textbrewer`` package,
0.2.x): the loss, the projections, the training loop, gradient clipping, the optimizer steps
and the checkpoint/callback schedule are TextBrewer's own. We supply what TextBrewer leaves to
its user, built with the same project code as ``finetune/glue.py``, so that the benchmark
compares objectives and not plumbing: the same fine-tuned teacher, the same student (a given
``--student`` directory or a fresh student of the ``--student_*`` shape with the teacher's
vocabulary, built by ``lrcbert.models.build_student`` after seeding with ``--seed``; a
regression head starts at the training labels' median, ``init_regression_head``), the same
tokenization, training order (``TrainOrder``: one permutation of the first
``--max_train_samples`` examples per epoch, drawn from ``seed + epoch``), optimizer (AdamW,
weight decay not on biases/LayerNorm), learning-rate shape (linear warm-up over ``--warmup``,
then linear decay to 0) and dev metrics (``lrcbert.data.glue_metrics``).

TextBrewer configuration (N teacher layers, M student layers; hidden_states indices, 0 = the
embedding output):

* ``DistillationConfig(temperature=--temperature, kd_loss_type='ce', kd_loss_weight=1,
  hard_label_weight=1, intermediate_matches=[...])`` for classification: TextBrewer's soft
  loss is the cross-entropy ``-sum softmax(z_T/t) * log_softmax(z_S/t)`` (no t^2 factor).
* STS-B (regression): ``kd_loss_type='mse'`` and temperature 1, since TextBrewer's MSE divides
  both predictions by t (a 1/t^2 scale) while our recipe's regression soft loss is plain MSE.
* ``intermediate_matches``: ``{'feature': 'hidden', 'loss': 'hidden_mse', 'weight': 1,
  'proj': ['linear', student_hidden, teacher_hidden]}`` for student layer 0 -> teacher layer 0
  (embeddings) and student layer i -> teacher layer floor(i*N/M) for i = 1..M
  (``lrcbert.method.layer_map.uniform_layer_map``); the MSE is masked to real tokens
  (``inputs_mask`` = attention mask). Each match has its own TextBrewer ``linear_projection``
  (bias, init std 0.02), trained with the student and never exported.
* Hard-label loss: the adaptor returns the Hugging Face model's own loss (the student runs
  with ``labels``: cross-entropy, or MSE for STS-B) as ``losses``; weight 1.
* ``TrainingConfig(device=cuda if available else cpu, log_dir=OUT/textbrewer/tensorboard,
  output_dir=OUT/textbrewer/checkpoints, ckpt_steps=--eval_steps or --max_steps)``;
  ``distiller.train(num_steps=--max_steps, max_grad_norm=--max_grad_norm,
  scheduler_class=LambdaLR)``: exactly ``--max_steps`` optimizer steps of
  ``--train_batch_size`` examples, one process.

TextBrewer saves the student's state dict at every checkpoint step; the callback deletes all
but the newest, and the last one is deleted once ``OUT/model`` holds the same weights.

Differences from our recipe that are TextBrewer's own and kept as they are: its clipping covers
the student's parameters only (not the projections), and each projection joins the optimizer as
one group with AdamW's default weight decay (0.01, bias included).

With torch 2.13 / transformers 5.24 / textbrewer 0.2.1.post1 nothing needed patching: the Hugging
Face outputs carry ``hidden_states`` when ``output_hidden_states=True`` is passed through
``distiller.train(**args)``; without tensorboardX TextBrewer falls back to
``torch.utils.tensorboard``; its ``is not 'none'`` comparisons only warn at compile time.
Two API points the script handles: ``train(num_steps=...)`` needs ``ckpt_steps`` set (None fails
in ``int()``), and TextBrewer ``cycle``s the data iterable, so ours draws a new permutation on
each pass.

Outputs, in ``finetune/glue.py``'s format: ``OUT/eval_results.json`` (``{"task", "stage":
"textbrewer", "steps", <dev split>: {metric: value}, "teacher": {...}}``), ``OUT/args.json``,
``OUT/model/`` (the student with its task head and the tokenizer), with ``--eval_steps N``
``OUT/curve.json`` (``[{"step": s, "<metric>": v}, ...]``); TextBrewer's log and TensorBoard
scalars stay under ``OUT/textbrewer/``. Bad input: ``error: <one line>`` on stderr, exit 2,
before any training.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import read_scalars  # noqa: E402
from lrcbert.config import flag, parse_args  # noqa: E402
from lrcbert.data import glue, glue_metrics  # noqa: E402
from lrcbert.data.batches import Encoded, TrainOrder, collate, encode  # noqa: E402
from lrcbert.data.text import load_tokenizer  # noqa: E402
from lrcbert.errors import UserError, exit_on_user_error  # noqa: E402
from lrcbert.flags import GlueStudentFlags, StudentFlags  # noqa: E402
from lrcbert.files import write_json_atomic  # noqa: E402
from lrcbert.method.layer_map import format_layer_map, uniform_layer_map  # noqa: E402
from lrcbert.method.schedule import warmup_linear_decay, warmup_steps_from  # noqa: E402
from lrcbert.models import (build_student, check_positions, check_teacher_labels,  # noqa: E402
                            count_parameters, export_hf, init_regression_head, load_config, load_teacher,
                            student_config_for)
from lrcbert.runtime.checkpoints import seed_everything  # noqa: E402
from lrcbert.runtime.engine import build_optimizer  # noqa: E402

STAGE = "textbrewer"


@dataclass
class BaselineArgs(GlueStudentFlags, StudentFlags):
    """TinyBERT-style task distillation with TextBrewer's GeneralDistiller (an external baseline).
    Task, data, student and optimizer flags are finetune/glue.py's (lrcbert/flags.py)."""

    finetuned_teacher: str = flag("the fine-tuned teacher: a finetune/glue.py --stage teacher output dir "
                                  "or its model/ folder (a Hugging Face classifier dir)")
    output_dir: str = flag("where model/, eval_results.json, args.json, curve.json and textbrewer/ go")
    max_steps: int = flag("optimizer steps (required, > 0)", -1)
    train_batch_size: int = flag("examples per optimizer step", 16)
    eval_steps: int = flag("also evaluate on dev every N steps, curve in OUTPUT_DIR/curve.json (0 = only at the end)",
                           0)
    seed: int = flag("random seed (data order, initialization, dropout)", 42)


# ------------------------------------------------------------------------------------ setup

@dataclass
class Prepared:
    task: glue.TaskSpec
    teacher_dir: str
    teacher_cfg: object
    student_cfg: object
    tokenizer: object
    layer_map: list
    encoded: dict[str, Encoded]
    order: TrainOrder


def resolve_teacher_dir(path: str) -> str:
    """``path`` itself when it is a model dir, else its ``model/`` folder (a glue.py output dir)."""
    if not os.path.isdir(path):
        raise UserError(f"--finetuned_teacher directory not found: {path}")
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise UserError(f"--finetuned_teacher {path} holds no config.json, neither itself nor in model/ "
                    "(expected a finetune/glue.py --stage teacher output)")


def setup(args: BaselineArgs) -> Prepared:
    """Every check on the user's input, before any model is built."""
    if importlib.util.find_spec("textbrewer") is None:
        raise UserError("the textbrewer package is not installed (pip install textbrewer)")
    task = glue.get_task(args.task)
    if args.data_dir and not os.path.isdir(args.data_dir):
        raise UserError(f"--data_dir not found: {args.data_dir}")
    if args.max_steps <= 0:
        raise UserError(f"--max_steps must be positive, got {args.max_steps}")
    for name in ("train_batch_size", "eval_batch_size", "max_seq_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.eval_steps < 0:
        raise UserError(f"--eval_steps must be 0 or positive, got {args.eval_steps}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be positive, got {args.temperature}")
    if args.warmup < 0:
        raise UserError(f"--warmup must not be negative, got {args.warmup}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} exists and is not a directory")
    teacher_dir = resolve_teacher_dir(args.finetuned_teacher)
    teacher_cfg = load_config(teacher_dir, "teacher")
    check_teacher_labels(task, teacher_cfg, teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    shape = args.student_shape
    student_cfg = student_config_for(args.student, teacher_cfg, shape, tokenizer)
    check_positions(args.max_seq_length, teacher=teacher_cfg, student=student_cfg)
    m, n = student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers
    if m > n:  # phi(i) = floor(i*N/M) would map two student layers onto one teacher layer
        raise UserError(f"a {m}-layer student cannot be mapped onto the {n}-layer teacher: the student "
                        "must not be deeper than the teacher (--student_layers, or a shallower --student)")
    layer_map = uniform_layer_map(m, n)
    splits = {"train": glue.load_examples(task, args.data_dir, "train", args.max_train_samples)}
    for split in task.dev_splits:
        splits[split] = glue.load_examples(task, args.data_dir, split, args.max_eval_samples)
    encoded = {name: encode(tokenizer, ex.text_a, ex.text_b, ex.labels, ex.index, args.max_seq_length)
               for name, ex in splits.items()}
    order = TrainOrder(len(encoded["train"]), args.train_batch_size, 1, 0, 1, args.seed)
    if order.steps_per_epoch < 1:
        raise UserError(f"{len(encoded['train'])} training examples do not fill one batch of "
                        f"{args.train_batch_size}")
    return Prepared(task, teacher_dir, teacher_cfg, student_cfg, tokenizer, layer_map, encoded, order)


# ------------------------------------------------------------------------------------ data and adaptors

class TrainBatches:
    """The training stream TextBrewer cycles over: each pass is one epoch of ``TrainOrder``
    (a fresh permutation from ``seed + epoch``), whole batches only.

    A batch is ``{"teacher": inputs, "student": inputs + labels}``, TextBrewer's form for
    different inputs per model: the teacher gets no labels (no loss to compute), the student's
    Hugging Face head computes the hard-label loss from them.
    """

    def __init__(self, data: Encoded, order: TrainOrder, pad_id: int, regression: bool):
        self.data, self.order, self.pad_id, self.regression = data, order, pad_id, regression
        self.consumed = 0  # batches handed out so far, over all epochs

    def __len__(self) -> int:
        return self.order.steps_per_epoch

    def __iter__(self):
        for _ in range(self.order.steps_per_epoch):
            batch = collate(self.data, self.order.rows(self.consumed), self.pad_id, self.regression)
            self.consumed += 1
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            yield {"teacher": inputs, "student": {**inputs, "labels": batch["labels"]}}


def adaptor_teacher(batch: dict, outputs) -> dict:
    """Teacher outputs as TextBrewer's dict: logits, hidden states (embeddings + every layer), mask."""
    return {"logits": outputs.logits, "hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"]}


def adaptor_student(batch: dict, outputs) -> dict:
    """The student's, plus its Hugging Face loss on the gold labels as TextBrewer's hard-label ``losses``."""
    return {"logits": outputs.logits, "hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"],
            "losses": outputs.loss}


def intermediate_matches(layer_map: list[tuple[int, int]], student_hidden: int, teacher_hidden: int) -> list[dict]:
    """TinyBERT's hidden-state matches: embeddings 0 -> 0, then student layer i -> teacher phi(i)."""
    pairs = [(0, 0)] + list(layer_map)
    return [{"layer_S": s, "layer_T": t, "feature": "hidden", "loss": "hidden_mse", "weight": 1,
             "proj": ["linear", student_hidden, teacher_hidden]} for s, t in pairs]


# ------------------------------------------------------------------------------------ evaluate

@torch.no_grad()
def predict(model, data: Encoded, batch_size: int, pad_id: int, device) -> np.ndarray:
    model.eval()
    outs = []
    for start in range(0, len(data), batch_size):
        batch = collate(data, range(start, min(start + batch_size, len(data))), pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       token_type_ids=batch["token_type_ids"].to(device)).logits
        outs.append(logits.float().cpu())
    return torch.cat(outs).numpy()


def evaluate(task, model, encoded: dict[str, Encoded], batch_size: int, pad_id: int, device) -> dict:
    """Each dev split's metrics under their official names (``glue_metrics``), as glue.py writes them."""
    results = {}
    for split in task.dev_splits:
        logits = predict(model, encoded[split], batch_size, pad_id, device)
        preds = logits.reshape(-1) if task.is_regression else logits.argmax(-1)
        results[split] = glue_metrics.compute_metrics(task, preds, np.asarray(encoded[split].labels))
    return results


def curve_point(step: int, results: dict, first_split: str) -> dict:
    """``{"step": s, metric: v}`` for the first dev split; other splits' metrics as ``split/metric``."""
    point = {"step": step, **results[first_split]}
    for split, metrics in results.items():
        if split != first_split:
            point.update({f"{split}/{name}": value for name, value in metrics.items()})
    return point


def loss_summary(log_dir: str) -> dict | None:
    """First and last steps' mean total loss from TextBrewer's TensorBoard scalars (None if unreadable)."""
    try:
        values = list(read_scalars(log_dir)["scalar/total_loss"].values())
    except Exception:  # noqa: BLE001 - a summary line only; the scalars stay on disk
        return None
    if not values:
        return None
    k = max(1, min(10, len(values) // 4))
    return {"steps": len(values), "first": float(np.mean(values[:k])), "last": float(np.mean(values[-k:])),
            "window": k}


# ------------------------------------------------------------------------------------ main

@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(BaselineArgs, argv)
    train(args, setup(args))  # setup: every check on the input, before any model or output
    return 0


def fresh_output_dir(out: str) -> str:
    """The output dir, with anything a previous run of this script left there removed
    (a failed rerun must not leave an old eval_results.json looking like its result)."""
    os.makedirs(out, exist_ok=True)
    for name in ("eval_results.json", "curve.json", "args.json"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    tb_dir = os.path.join(out, "textbrewer")
    shutil.rmtree(tb_dir, ignore_errors=True)
    os.makedirs(tb_dir)
    return tb_dir


def textbrewer_logger(path: str) -> logging.Handler:
    """TextBrewer's ``Distillation`` logger into a file under OUT (not onto our stdout)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(name)s - %(message)s"))
    logger = logging.getLogger("Distillation")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    return handler


def train(args: BaselineArgs, p: Prepared) -> None:
    import textbrewer
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    task = p.task
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pad_id = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else 0
    out = args.output_dir
    tb_dir = fresh_output_dir(out)
    log_handler = textbrewer_logger(os.path.join(tb_dir, "textbrewer.log"))
    write_json_atomic(os.path.join(out, "args.json"), asdict(args))

    # ---- models, in finetune/glue.py's order: seed, teacher, student (+ regression head), projections, dropout seed
    seed_everything(args.seed)
    teacher = load_teacher(p.teacher_dir, task_head=True, device=device)
    label_names = None if task.is_regression else list(task.label_names)
    student = build_student(p.student_cfg, path=args.student, task_head=True, label_names=label_names)
    if task.is_regression:
        init_regression_head(student, float(np.median(p.encoded["train"].labels)))
    student.to(device)
    print(f"TextBrewer {textbrewer.__version__} GeneralDistiller on {task.name}: {len(p.encoded['train'])} training "
          f"examples, {args.max_steps} steps of batch {args.train_batch_size}, device {device}")
    print(f"student: {count_parameters(student) / 1e6:.1f}M parameters "
          f"({p.student_cfg.num_hidden_layers} layers x {p.student_cfg.hidden_size}); teacher "
          f"{p.teacher_cfg.num_hidden_layers} layers x {p.teacher_cfg.hidden_size} from {p.teacher_dir}")
    print(format_layer_map([(0, 0)] + p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size))
    teacher_results = evaluate(task, teacher, p.encoded, args.eval_batch_size, pad_id, device)
    first = task.dev_splits[0]
    print(f"teacher on {first}: {task.primary_metric} {teacher_results[first][task.primary_metric]:.4f}", flush=True)

    # ---- TextBrewer: configuration, distiller, optimizer and schedule
    ckpt_dir = os.path.join(tb_dir, "checkpoints")
    train_config = TrainingConfig(device=device, log_dir=os.path.join(tb_dir, "tensorboard"), output_dir=ckpt_dir,
                                  ckpt_steps=args.eval_steps if args.eval_steps > 0 else args.max_steps)
    distill_config = DistillationConfig(
        temperature=1.0 if task.is_regression else args.temperature,
        kd_loss_type="mse" if task.is_regression else "ce", kd_loss_weight=1, hard_label_weight=1,
        intermediate_matches=intermediate_matches(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size))
    distiller = GeneralDistiller(train_config=train_config, distill_config=distill_config, model_T=teacher,
                                 model_S=student, adaptor_T=adaptor_teacher, adaptor_S=adaptor_student)
    # the projections (built just now) join the optimizer in distiller.train (initialize_training) as one
    # group each, with AdamW's default weight decay (0.01, their bias included); the schedule is built there too
    optimizer = build_optimizer(student, args.learning_rate, args.weight_decay)
    warmup = warmup_steps_from(args.warmup, args.max_steps)
    torch.manual_seed(args.seed)  # dropout, as glue.py's run.seed_dropout on rank 0

    curve: list[dict] = []
    steps_done = [0]
    eval_s = [0.0]  # time in the callback's evaluations, left out of the seconds per step
    started = time.time()

    def callback(model, step: int) -> None:
        """TextBrewer calls this after saving gs{step}.pkl: keep only that file; evaluate when due."""
        steps_done[0] = step
        for path in glob.glob(os.path.join(ckpt_dir, "gs*.pkl")):
            if os.path.basename(path) != f"gs{step}.pkl":
                os.remove(path)
        if args.eval_steps > 0 and step < args.max_steps:
            tick = time.time()
            per_step = (tick - started - eval_s[0]) / step
            results = evaluate(task, model, p.encoded, args.eval_batch_size, pad_id, device)
            curve.append(curve_point(step, results, first))
            write_json_atomic(os.path.join(out, "curve.json"), curve)
            eval_s[0] += time.time() - tick
            print(f"step {step}: dev {task.primary_metric} {results[first][task.primary_metric]:.4f} "
                  f"({per_step:.3f} s/step)", flush=True)

    batches = TrainBatches(p.encoded["train"], p.order, pad_id, task.is_regression)
    with distiller:  # TextBrewer's context: teacher in eval mode, student in train mode
        distiller.train(optimizer, batches, num_steps=args.max_steps, max_grad_norm=args.max_grad_norm,
                        scheduler_class=torch.optim.lr_scheduler.LambdaLR,
                        scheduler_args={"lr_lambda": warmup_linear_decay(warmup, args.max_steps)},
                        callback=callback, output_hidden_states=True)
    train_s = time.time() - started - eval_s[0]
    if steps_done[0] != args.max_steps:
        raise RuntimeError(f"TextBrewer stopped after {steps_done[0]} of {args.max_steps} steps")
    if hasattr(distiller.tb_writer, "close"):
        distiller.tb_writer.close()
    logging.getLogger("Distillation").removeHandler(log_handler)
    log_handler.close()

    # ---- evaluate and save
    results = evaluate(task, student, p.encoded, args.eval_batch_size, pad_id, device)
    losses = loss_summary(os.path.join(tb_dir, "tensorboard"))
    for name, value in results[first].items():
        if not math.isfinite(value):
            raise RuntimeError(f"dev {name} is {value}: the run diverged")
    export_hf(student.state_dict(), "", student.config, p.tokenizer, os.path.join(out, "model"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the last gs{N}.pkl: the same weights as model/
    if args.eval_steps > 0:
        curve.append(curve_point(args.max_steps, results, first))
        write_json_atomic(os.path.join(out, "curve.json"), curve)
    write_json_atomic(os.path.join(out, "eval_results.json"),
                      {"task": task.name, "stage": STAGE, "steps": steps_done[0], **results, "teacher": teacher_results})
    if losses is not None:
        print(f"train loss (TextBrewer total): first {losses['window']} steps {losses['first']:.4f}, "
              f"last {losses['window']} steps {losses['last']:.4f}")
    print(f"trained {args.max_steps} steps in {train_s:.1f} s ({train_s / args.max_steps:.3f} s/step, "
          f"evaluations left out)")
    print(json.dumps({"eval": results, "teacher": teacher_results}))


if __name__ == "__main__":
    sys.exit(main())
