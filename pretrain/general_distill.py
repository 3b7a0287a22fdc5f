"""General distillation with LRC-BERT: COS-NCE on unlabeled text, with gradient perturbation.

    python pretrain/prepare_corpus.py --input wiki.train.raw --tokenizer TEACHER_DIR --output_dir corpus/
    deepspeed pretrain/general_distill.py --ds_config ds_configs/z2.json --config configs/pretrain_small.json \
        --teacher TEACHER_DIR --corpus corpus/ --output_dir runs/general

Env-based launchers (srun, torchrun) work too: ranks come from RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. The loop is written out: setup -> train (teacher forward, clean
student pass, gradient perturbation, perturbed pass, backward, step, enqueue into the memory
bank) -> checkpoint -> export. The student in ``OUTPUT_DIR/model`` is a plain encoder
(``AutoModel.from_pretrained`` loads it) for ``finetune/glue.py --student``.

Choices of ours (the paper gives no general-distillation recipe beyond "COS-NCE on Wikipedia"):
- The loss is COS-NCE summed over the mapped layers; no prediction-layer loss (alpha = 1).
- ``--negatives bank`` (default): K negatives per sample from the sharded memory bank of
  pooled teacher vectors of earlier steps (MoCo-style), never the sample's own corpus row.
  The bank is ``--bank_groups`` FIFO groups (group g on rank g % world; rows stay on the rank
  that produced them) and a sample's K negatives come from one group, so the bytes a rank
  moves per step do not grow with the world size. Until some group holds K + 1 vectors
  (about ceil((K + 1) * groups / global batch) steps) negatives come from the other rows of
  the global micro-batch, K capped at its size - 1; ``bank/in_use`` in TensorBoard shows which
  source a step used. ``--bank_groups`` defaults to 64 whatever the world size (lowered, with a
  note, until a group holds more than K slots) so that a run can resume at any world size that
  divides it.
- Every micro-batch's teacher vectors are held and enqueued after the optimizer step, so all
  micro-batches of one step score against the same bank. The bank zero-pads vectors to
  ``max_seq_length`` tokens (flatten pooling), which changes no cosine.
- Under bf16/fp16 the frozen teacher runs in that precision too (its forward is most of
  the cost); cosines are fp32 everywhere.
- The student's pooler gets no gradient from COS-NCE and is frozen (the task stage trains it).
- SIGUSR1 or SIGTERM (from the first line of ``main``, start-up included): the current step
  finishes, every rank checkpoints, ``OUTPUT_DIR/preempted`` is written and the process exits 0
  (``--resume`` continues; e.g. ``sbatch --signal=USR1@120`` with ``--requeue``). Under the
  ``deepspeed`` launcher, signal the ranks, or SIGTERM the launcher, which gives them 30 s.
- A rank that dies (SIGKILL, OOM) is noticed by the others' watchdog (``lrcbert.runtime.guards.Watchdog``):
  they exit with status 3 and a message naming it instead of waiting in a collective. A NaN/inf
  loss stops the run with an error naming the step and the corpus rows of the micro-batch.
- ``--resume`` at another world size keeps the global batch (micro batch or accumulation
  adjusted, said in one start-up line), re-shards the bank (``MemoryBank.reshard``), converts
  the data position, and loads ZeRO-partitioned optimizer state through DeepSpeed's universal
  checkpoint (docs/OPERATING.md, "Resume at another world size").

``--config FILE.json`` reads flag values from a JSON object whose keys are flag names
(``{"micro_batch_size": 32, "perturb": true}``); flags on the command line override it and
an unknown key is an error. ``configs/pretrain_*.json`` are examples.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lrcbert.config import flag, parse_args  # noqa: E402
from lrcbert.data.corpus import CorpusDataset, RankBatches, check_compatible  # noqa: E402
from lrcbert.data.text import load_tokenizer  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.flags import PERTURB_KNOBS, PERTURBATION_FLAGS, SharedFlags  # noqa: E402
from lrcbert.method.bank import DEFAULT_GROUPS, MemoryBank, resolve_groups  # noqa: E402
from lrcbert.method.layer_map import format_layer_map, parse_layer_map  # noqa: E402
from lrcbert.method.losses import LossWeights  # noqa: E402
from lrcbert.method.negatives import negative_generator  # noqa: E402
from lrcbert.method.objective import LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.method.schedule import warmup_linear_decay, warmup_steps_from  # noqa: E402
from lrcbert.models import (DistillStudent, build_student, check_positions, count_parameters, export_hf,  # noqa: E402
                            load_config, load_teacher, student_config_for)
from lrcbert.model_card import command_line, write_model_card  # noqa: E402
from lrcbert.monitor import Monitor  # noqa: E402
from lrcbert.runtime.checkpoints import (check_output_dir, check_resumed_flags, resume_layout,  # noqa: E402
                                         resumed_micro_step)
from lrcbert.runtime.ds_config import (PRECISIONS, TrainerSettings, check_perturbation_supported,  # noqa: E402
                                       resolve_ds_config, zero_stage)
from lrcbert.runtime.engine import Engine, build_optimizer, check_precision_supported  # noqa: E402
from lrcbert.runtime.guards import check_finite_loss  # noqa: E402
from lrcbert.runtime import plan  # noqa: E402
from lrcbert.runtime.ranks import env_rank, env_world_size  # noqa: E402
from lrcbert.runtime.run import Run, RunSettings  # noqa: E402

COS_ONLY = LossWeights(1.0, 0.0, 0.0)  # general distillation: COS-NCE only, alpha = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PretrainArgs(SharedFlags):
    """LRC-BERT general distillation: COS-NCE with gradient perturbation on a tokenized corpus."""

    teacher: str = flag("teacher: a Hugging Face BERT-style encoder dir (or hub name); frozen")
    corpus: str = flag("corpus dir made by pretrain/prepare_corpus.py with the teacher's tokenizer")
    output_dir: str = flag("where model/, checkpoints/, tensorboard/ and args.json go")
    config: str | None = flag("JSON file of flag values (keys are flag names); command-line flags override it", None)
    student: str | None = flag("student HF encoder dir to continue from; "
                               "default: a fresh student of --student_* shape with the teacher's vocabulary", None)
    precision: str = flag("fp32, fp16 (dynamic loss scale) or bf16; the teacher runs in it too", "fp32",
                          choices=PRECISIONS)
    micro_batch_size: int = flag("sequences per rank per micro-step", 32)
    learning_rate: float = flag("peak learning rate", 1e-4)
    warmup: float = flag("warm-up: a fraction of the steps if < 1, else a step count; then linear decay to 0", 0.01)
    num_epochs: float = flag("passes over the corpus (used when --max_steps <= 0)", 1.0)
    max_steps: int = flag("optimizer steps: the length of the lr schedule; overrides --num_epochs when > 0", -1)
    max_seq_length: int = flag("tokens per sequence, special tokens included; must match the corpus", 128)
    negatives: str = flag("bank: memory bank of earlier steps' teacher vectors (batch negatives until a group "
                          "holds K+1); batch: other rows of the global batch", "bank", choices=["bank", "batch"])
    num_negatives: int = flag("K negatives per sample", 15)
    bank_size: int = flag("memory bank slots (whole bank, all ranks): at least the global batch, divisible by "
                          "--bank_groups into groups of more than K slots", 4096)
    bank_groups: int = flag("memory bank groups: each positive's K negatives come from one group, and group g "
                            "lives on rank g %% world; the world size must divide it (and every world size "
                            "you may resume at). Lowered to the largest divisor of --bank_size whose groups "
                            "hold more than K slots", DEFAULT_GROUPS)
    bank_dtype: str = flag("storage precision of the bank's vectors (maths is fp32)", "fp16", choices=DTYPES)
    save_steps: int = flag("checkpoint every N steps (0 = only at the end)", 1000)
    resume: bool = flag("continue from OUTPUT_DIR/checkpoints/latest, at this or another world size (the global "
                        "batch is kept; the bank is re-sharded)", False)


# ------------------------------------------------------------------------------------ setup

@dataclass
class Prepared:
    """What setup validated and train needs."""

    ds_config: dict
    teacher_cfg: object
    student_cfg: object
    tokenizer: object
    layer_map: list
    corpus: CorpusDataset
    total_steps: int
    bank_dim: int
    bank_bytes_per_rank: int
    bank_groups: int = 1


def setup(args: PretrainArgs) -> Prepared:
    """Everything that can fail on bad input, before any process group or model exists."""
    check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(f"--max_steps must be positive (or -1: from --num_epochs), got {args.max_steps}")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length", "log_steps",
                 "num_negatives", "bank_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.max_steps <= 0 and args.num_epochs <= 0:
        raise UserError("give a positive --max_steps or --num_epochs")
    if args.save_steps < 0:
        raise UserError("--save_steps must be 0 (only at the end) or positive")
    world = args.planned_world_size(env_world_size())
    rank = 0 if args.dry_run else env_rank()
    elastic = resume_layout(args, world, rank)
    settings = TrainerSettings(args.micro_batch_size, args.gradient_accumulation_steps, world,
                               args.max_grad_norm, args.precision)
    ds_config = resolve_ds_config(args.ds_config, settings)
    if elastic is not None:
        elastic.configure(ds_config)
    check_precision_supported(args.precision)
    if args.perturb:
        check_perturbation_supported(ds_config, args.ds_config)

    teacher_cfg = load_config(args.teacher, "teacher")
    tokenizer = load_tokenizer(args.teacher, require_fast=True)  # the corpus check reads its Rust backend
    student_cfg = student_config_for(args.student, teacher_cfg, args.student_shape, tokenizer)
    check_positions(args.max_seq_length, teacher=teacher_cfg, student=student_cfg)
    layer_map = parse_layer_map(args.layer_map, student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)

    if not os.path.isdir(args.corpus):
        raise UserError(f"--corpus directory not found: {args.corpus}")
    corpus = CorpusDataset(args.corpus)
    check_compatible(corpus, tokenizer, args.max_seq_length)
    batches = RankBatches(corpus, args.micro_batch_size, rank, world, args.seed)  # refuses a too-small corpus
    if args.max_steps > 0:
        total_steps = args.max_steps
    else:
        total_steps = int(args.num_epochs * len(batches) / args.gradient_accumulation_steps)
        if total_steps < 1:
            raise UserError(f"--num_epochs {args.num_epochs} of {len(batches)} micro-batches is less than one "
                            f"optimizer step of {args.gradient_accumulation_steps} micro-batches")

    # flatten pooling: (T * d') per layer, zero-padded to max_seq_length tokens
    bank_dim = teacher_cfg.hidden_size * (args.max_seq_length if args.pooling == "flatten" else 1)
    bank_bytes, groups = 0, 1
    if args.negatives == "bank":
        if args.bank_size < settings.global_batch_size:
            raise UserError(f"memory bank size {args.bank_size} is smaller than the global batch size "
                            f"{settings.global_batch_size}")
        groups = resolve_groups(args.bank_size, args.bank_groups, args.num_negatives)
        if groups != args.bank_groups and rank == 0:
            print(f"note: --bank_groups {args.bank_groups} lowered to {groups}: groups of --bank_size "
                  f"{args.bank_size} / {groups} = {args.bank_size // groups} slots, more than K = "
                  f"{args.num_negatives}", flush=True)
        probe = MemoryBank(len(layer_map), args.bank_size, bank_dim, rank, world, DTYPES[args.bank_dtype],
                           device="meta", groups=groups)  # checks groups vs world size without allocating
        probe.validate(args.num_negatives, settings.global_batch_size)
        bank_bytes = probe.bytes_per_rank()
    return Prepared(ds_config, teacher_cfg, student_cfg, tokenizer, layer_map, corpus, total_steps, bank_dim,
                    bank_bytes, groups)


# ------------------------------------------------------------------------------------ resume

def data_position(state: dict, global_micro_batch: int, batches_per_epoch: int) -> dict:
    """The saved RankBatches position, converted when the global micro-batch changed
    (another world size): the same sequences of the epoch count as consumed, rounded up."""
    data = dict(state["data"])
    saved = data.pop("global_micro_batch", global_micro_batch)
    if saved != global_micro_batch:
        consumed = data["batch_index"] * saved
        data["batch_index"] = min(batches_per_epoch, math.ceil(consumed / global_micro_batch))
    return data


def load_bank(bank: MemoryBank, files: list[str], rank: int, world: int) -> None:
    """This rank's bank shard from a checkpoint, re-sharded when it was saved at another world size."""
    if not files:
        raise UserError("--resume: the checkpoint holds no memory bank (saved with --negatives batch?); "
                        "resume with --negatives batch")
    if len(files) == world:
        shard = torch.load(files[rank], map_location="cpu", weights_only=True)["bank"]
    else:  # every rank holds the whole bank once, in host memory, for the conversion
        shards = [torch.load(f, map_location="cpu", weights_only=True)["bank"] for f in files]
        shard = MemoryBank.reshard(shards, world)[rank]
    bank.load_state_dict(shard)


# flags that decide what a checkpoint was trained on, beyond its shapes: a resume must keep them
SAME_ON_RESUME = ("max_seq_length", "layer_map", "pooling", "cos_nce_form", "negatives", "num_negatives",
                  *PERTURBATION_FLAGS)


def check_same_objective(saved: dict, args: PretrainArgs, layer_map: list, student_layers: int,
                         teacher_layers: int) -> None:
    """The resumed run trains on the checkpoint's objective: COS-NCE form, pooling, negatives,
    layer map (compared as parsed, so "auto" equals the map it stands for), sequence length and
    perturbation. A checkpoint saved before a flag existed trained with that flag's default."""
    fields = PretrainArgs.__dataclass_fields__

    def objective(values: dict) -> dict:
        out = {k: values.get(k, fields[k].default) for k in SAME_ON_RESUME}
        if not out["perturb"]:
            for k in PERTURB_KNOBS:
                del out[k]
        return out

    before, now = objective(saved), objective(asdict(args))
    if parse_layer_map(before["layer_map"], student_layers, teacher_layers) == layer_map:
        before["layer_map"] = now["layer_map"]
    check_resumed_flags(before, now)


def forever(batches: RankBatches):
    """This rank's micro-batches, epoch after epoch (the position lives in ``batches``)."""
    while True:
        yield from batches


# ------------------------------------------------------------------------------------ main

def parse_flags(argv: list[str] | None = None) -> PretrainArgs:
    """Flags, with ``--config`` values first so that command-line flags override them."""
    return parse_args(PretrainArgs, argv, description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    with Run() as run:  # first: a signal during start-up must not kill the job
        args = parse_flags(argv)
        prepared = setup(args)
        if args.dry_run:
            print(plan.describe(dry_run_plan(args, prepared)), flush=True)
        else:
            train(run, args, prepared)
    return run.exit_status


def dry_run_plan(args: PretrainArgs, p: Prepared) -> plan.Plan:
    world = args.planned_world_size(env_world_size())
    batches = RankBatches(p.corpus, args.micro_batch_size, 0, world, args.seed)
    epochs = p.total_steps * args.gradient_accumulation_steps / len(batches)
    result = plan.Plan.for_run(
        "pretrain/general_distill.py (general distillation)", args, world, p.total_steps, p.ds_config,
        layer_map_text=format_layer_map(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size),
        trained_parameters=plan.trained_parameters(p.student_cfg, False, len(p.layer_map), p.teacher_cfg.hidden_size),
        teacher_parameters=plan.count_on_meta(p.teacher_cfg, with_head=False),
        bank_bytes_per_rank=p.bank_bytes_per_rank,
        data_text=f"{epochs:.2f} epochs of {len(p.corpus):,} sequences ({len(batches):,} micro-batches per rank "
                  "per epoch)")
    activations = plan.activation_bytes(p.student_cfg, p.teacher_cfg, args.micro_batch_size, args.max_seq_length,
                                        args.precision, len(p.layer_map), p.bank_dim,
                                        args.micro_batch_size * world, args.perturbation.student_passes)
    plan.estimate_memory(result, activations)
    return result


def train(run: Run, args: PretrainArgs, p: Prepared) -> None:
    run.start(RunSettings.from_flags(args, p.total_steps))
    batches = RankBatches(p.corpus, args.micro_batch_size, run.rank, run.world, args.seed)
    global_micro_batch = args.micro_batch_size * run.world

    # ---- models and the memory bank
    teacher = load_teacher(args.teacher, task_head=False, device=run.device, dtype=DTYPES[args.precision])
    student_hf = build_student(p.student_cfg, path=args.student, task_head=False)
    module = DistillStudent(student_hf, [s for s, _ in p.layer_map], p.teacher_cfg.hidden_size)
    bank = None
    if args.negatives == "bank":
        bank = MemoryBank(len(p.layer_map), args.bank_size, p.bank_dim, run.rank, run.world,
                          DTYPES[args.bank_dtype], run.device, groups=p.bank_groups, seed=args.seed)
    if run.is_main:
        print(f"LRC-BERT general distillation: {len(p.corpus)} sequences ({len(batches)} micro-batches of "
              f"{global_micro_batch} per epoch), {p.total_steps} steps, global batch "
              f"{p.ds_config['train_batch_size']}, world {run.world}, {args.precision}, "
              f"ZeRO-{zero_stage(p.ds_config)}")
        print(f"student: {count_parameters(student_hf) / 1e6:.1f}M parameters; teacher: "
              f"{count_parameters(teacher) / 1e6:.1f}M")
        print(format_layer_map(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size))
        if bank is not None:
            print(f"memory bank: {args.bank_size} x {len(p.layer_map)} layers x {p.bank_dim} {args.bank_dtype} in "
                  f"{p.bank_groups} groups, {p.bank_bytes_per_rank / 2**20:.1f} MiB per rank; K = {args.num_negatives}")

    # ---- engine
    optimizer = build_optimizer(module, args.learning_rate, args.weight_decay)
    lr_schedule = warmup_linear_decay(warmup_steps_from(args.warmup, p.total_steps), p.total_steps)
    engine = Engine(module, optimizer, lr_schedule, p.ds_config)
    whole_parameters = engine.whole_parameters  # add-mode perturbation: two backward passes, not three
    run.seed_dropout(args.seed)
    micro_step = 0
    if args.resume:
        state = run.resume(engine, check=lambda saved: check_same_objective(
            saved["args"], args, p.layer_map, p.student_cfg.num_hidden_layers, p.teacher_cfg.num_hidden_layers))
        micro_step = resumed_micro_step(state, args.gradient_accumulation_steps)
        batches.load_state_dict(data_position(state, global_micro_batch, len(batches)))
        if bank is not None:
            load_bank(bank, state["rank_state_files"], run.rank, run.world)
        if run.is_main:
            print(f"resumed from step {engine.global_steps} (world {state.get('world_size')} -> {run.world})")

    objective = LRCObjective(p.layer_map, ObjectiveConfig(args.pooling, "cos_nce", args.num_negatives,
                                                          cos_nce_form=args.cos_nce_form))
    monitor = Monitor(os.path.join(args.output_dir, "tensorboard"), p.total_steps, engine.global_steps, run.is_main,
                      desc="general distillation")

    def save(step: int) -> None:
        data = dict(batches.state_dict(), global_micro_batch=global_micro_batch)
        state = {"micro_step": micro_step, "data": data, "args": asdict(args), "total_steps": p.total_steps}
        rank_state = {"bank": {k: v.cpu() for k, v in bank.state_dict().items()}} if bank is not None else None
        run.save(engine, step, state, args.keep_checkpoints, rank_state=rank_state)

    # ---- train
    stream = forever(batches)
    start_step, start_time = engine.global_steps, time.perf_counter()
    engine.train()
    while engine.global_steps < p.total_steps:
        use_bank = bank is not None and bank.ready(args.num_negatives)
        batch = {k: v.to(run.device) for k, v in next(stream).items()}
        t = objective.teacher(teacher, batch)
        if use_bank:  # one draw scores the clean and the perturbed pass
            negatives = bank.draw(batch["rows"], args.num_negatives, bank.make_generator(micro_step))
        else:
            negatives = objective.batch_negatives(t.vectors, negative_generator(args.seed, micro_step))
        loss, logs = objective.step(engine, batch, t, COS_ONLY, negatives, perturb=args.perturbation,
                                    probe=engine.module, loss_scale=engine.loss_scale,
                                    params=whole_parameters)
        check_finite_loss(loss, engine.global_steps, micro_step, batch["rows"].tolist, what="corpus sequences")
        engine.backward(loss)
        engine.step()
        micro_step += 1
        if bank is not None:
            bank.hold(t.vectors, batch["rows"])
        monitor.accumulate(logs, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))
        if micro_step % args.gradient_accumulation_steps:
            continue
        if bank is not None:
            bank.flush()
        done = engine.global_steps
        monitor.advance({"loss": float(logs["total"])})
        if done % args.log_steps == 0 or done == p.total_steps:
            extra = {"train/lr": engine.lr, "train/loss_scale": engine.loss_scale,
                     "train/skipped_steps": float(engine.skipped_steps),
                     "train/epoch": batches.epoch + batches.batch_index / len(batches)}
            if bank is not None:
                extra.update({"bank/fill": float(bank.fill), "bank/in_use": float(use_bank),
                              "bank/bytes_per_rank": float(bank.bytes_per_rank())})
            monitor.log(done, extra)
        stopping = run.should_stop(done)
        if run.checkpoint_due(done, stopping):
            save(done)
        if stopping:
            return run.leave(done, monitor)

    # ---- save
    elapsed = time.perf_counter() - start_time
    save(engine.global_steps)
    state = engine.full_state_dict()
    if run.is_main:
        export_hf(state, "model.", student_hf.config, p.tokenizer, os.path.join(args.output_dir, "model"),
                  with_head=False)
        write_model_card(os.path.join(args.output_dir, "model"), title="LRC-BERT general-distilled student",
                         recipe=f"General distillation (COS-NCE on the mapped layers, {args.negatives} negatives, "
                                f"K = {args.num_negatives}) on {len(p.corpus)} sequences of {args.corpus}: "
                                f"{engine.global_steps} optimizer steps, global batch "
                                f"{p.ds_config['train_batch_size']}, peak learning rate {args.learning_rate}, "
                                f"max_seq_length {args.max_seq_length}, {args.precision}.",
                         command=command_line("pretrain/general_distill.py"), teacher=args.teacher,
                         parameters=count_parameters(student_hf))
        run.write_json("args.json", asdict(args))
        samples = (engine.global_steps - start_step) * p.ds_config["train_batch_size"]
        summary = {"steps": engine.global_steps, "samples_per_sec": round(samples / max(elapsed, 1e-9), 2),
                   "bank_bytes_per_rank": p.bank_bytes_per_rank, "model": os.path.join(args.output_dir, "model")}
        if run.device.type == "cuda":  # this rank's high-water marks, the bank and both models included
            summary["peak_gpu_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(run.device)
            summary["peak_gpu_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(run.device)
        print(json.dumps(summary))
    run.finish(monitor)


if __name__ == "__main__":
    sys.exit(main())
