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
- ``--negatives bank`` (default): K negatives per sample from the sharded FIFO memory bank
  of pooled teacher vectors of earlier steps (MoCo-style), never the sample's own corpus
  row. Until the bank holds K + 1 vectors (the first ceil((K + 1) / global batch) steps)
  negatives come from the other rows of the global micro-batch, K capped at its size - 1;
  ``bank/in_use`` in TensorBoard shows which source a step used.
- Every micro-batch's teacher vectors are enqueued after the optimizer step, so all
  micro-batches of one step score against the same bank. Vectors are zero-padded to
  ``max_seq_length`` tokens (flatten pooling), which changes no cosine.
- Under bf16/fp16 the frozen teacher runs in that precision too (its forward is most of
  the cost); cosines are fp32 everywhere.
- The student's pooler gets no gradient from COS-NCE and is frozen (the task stage trains it).
- SIGUSR1 or SIGTERM (from the first line of ``main``, start-up included): the current step
  finishes, every rank checkpoints, ``OUTPUT_DIR/preempted`` is written and the process exits 0
  (``--resume`` continues; e.g. ``sbatch --signal=USR1@120`` with ``--requeue``). Under the
  ``deepspeed`` launcher, signal the ranks, or SIGTERM the launcher, which gives them 30 s.
- A rank that dies (SIGKILL, OOM) is noticed by the others' watchdog (``lrcbert.engine.Watchdog``):
  they exit with status 3 and a message naming it instead of waiting in a collective. A NaN/inf
  loss stops the run with an error naming the step and the corpus rows of the micro-batch.
- ``--resume`` at another world size re-shards the bank (``MemoryBank.reshard``) and converts
  the data position; DeepSpeed 0.19 reloads ZeRO-partitioned optimizer state only at the world
  size that saved it, so with ZeRO-1/2/3 (or bf16's optimizer) such a resume is refused at
  start-up; a ZeRO-0 fp32 run can change its world size.

``--config FILE.json`` reads flag values from a JSON object whose keys are flag names
(``{"micro_batch_size": 32, "perturb": true}``); flags on the command line override it and
an unknown key is an error. ``configs/pretrain_*.json`` are examples.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lrcbert import engine as eng  # noqa: E402
from lrcbert.bank import MemoryBank  # noqa: E402
from lrcbert.config import parse_args  # noqa: E402
from lrcbert.corpus import CorpusDataset, RankBatches, check_compatible  # noqa: E402
from lrcbert.distill import LRCObjective, ObjectiveConfig  # noqa: E402
from lrcbert.errors import UserError  # noqa: E402
from lrcbert.flags import SharedFlags  # noqa: E402
from lrcbert.layer_map import format_layer_map, parse_layer_map  # noqa: E402
from lrcbert.losses import LossWeights  # noqa: E402
from lrcbert.models import (DistillStudent, StudentShape, count_parameters, export_hf, freeze,  # noqa: E402
                            load_config, load_tokenizer, student_config, teacher_forward)
from lrcbert.monitor import Monitor  # noqa: E402
from lrcbert.negatives import negative_generator  # noqa: E402
from lrcbert.perturb import perturbed_loss  # noqa: E402
from lrcbert.schedule import warmup_linear_decay, warmup_steps_from  # noqa: E402

COS_ONLY = LossWeights(1.0, 0.0, 0.0)  # general distillation: COS-NCE only, alpha = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PretrainArgs(SharedFlags):
    """LRC-BERT general distillation: COS-NCE with gradient perturbation on a tokenized corpus."""

    teacher: str = field(metadata={"help": "teacher: a Hugging Face BERT-style encoder dir (or hub name); frozen"})
    corpus: str = field(metadata={"help": "corpus dir made by pretrain/prepare_corpus.py with the teacher's tokenizer"})
    output_dir: str = field(metadata={"help": "where model/, checkpoints/, tensorboard/ and args.json go"})
    config: str | None = field(default=None, metadata={"help": "JSON file of flag values (keys are flag names); command-line flags override it"})
    student: str | None = field(default=None, metadata={"help": "student HF encoder dir to continue from; default: a fresh student of --student_* shape with the teacher's vocabulary"})
    precision: str = field(default="fp32", metadata={"help": "fp32, fp16 (dynamic loss scale) or bf16; the teacher runs in it too", "choices": list(eng.PRECISIONS)})
    micro_batch_size: int = field(default=32, metadata={"help": "sequences per rank per micro-step"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    warmup: float = field(default=0.01, metadata={"help": "warm-up: a fraction of the steps if < 1, else a step count; then linear decay to 0"})
    num_epochs: float = field(default=1.0, metadata={"help": "passes over the corpus (used when --max_steps <= 0)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps: the length of the lr schedule; overrides --num_epochs when > 0"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per sequence, special tokens included; must match the corpus"})
    negatives: str = field(default="bank", metadata={"help": "bank: memory bank of earlier steps' teacher vectors (batch negatives until it holds K+1); batch: other rows of the global batch", "choices": ["bank", "batch"]})
    num_negatives: int = field(default=15, metadata={"help": "K negatives per sample"})
    bank_size: int = field(default=4096, metadata={"help": "memory bank slots (whole bank, all ranks): divisible by the world size, at least the global batch, more than K"})
    bank_dtype: str = field(default="fp16", metadata={"help": "storage precision of the bank's vectors (maths is fp32)", "choices": list(DTYPES)})
    save_steps: int = field(default=1000, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUTPUT_DIR/checkpoints/latest (another world size only without ZeRO partitions: the bank is re-sharded)"})


# ------------------------------------------------------------------------------------ flags

def parse_flags(argv: list[str] | None = None) -> PretrainArgs:
    """Flags, with ``--config`` values first so that command-line flags override them."""
    return parse_args(PretrainArgs, argv, description=__doc__.split("\n\n")[0])


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


def check_encoder(config, path: str, role: str) -> None:
    """Refuse anything but an encoder-only model with a BERT-style encoder stack (hidden states per layer)."""
    from transformers import AutoModel

    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UserError(f"{role} {path} ({kind}) is not an encoder-only model; use a BERT-style encoder")
    try:
        with torch.device("meta"):  # the architecture only: no memory, no weights read
            model = AutoModel.from_config(config)
    except Exception as exc:  # unknown or broken model types fail in many ways
        raise UserError(f"{role} {path}: AutoModel cannot build a {kind} model ({str(exc).splitlines()[0]})") from None
    if getattr(model.base_model, "encoder", None) is None:
        raise UserError(f"{role} {path} ({type(model).__name__}) is not a BERT-style encoder: "
                        "it has no encoder stack whose hidden states COS-NCE could use")


def setup(args: PretrainArgs) -> Prepared:
    """Everything that can fail on bad input, before any process group or model exists."""
    eng.check_output_dir(args.output_dir, args.resume, args.overwrite_output_dir)
    for name in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_length", "log_steps",
                 "num_negatives", "bank_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.max_steps <= 0 and args.num_epochs <= 0:
        raise UserError("give a positive --max_steps or --num_epochs")
    if args.save_steps < 0:
        raise UserError("--save_steps must be 0 (only at the end) or positive")
    world, rank = eng.env_world_size(), eng.env_rank()
    settings = eng.TrainerSettings(args.micro_batch_size, args.gradient_accumulation_steps, world,
                                   args.max_grad_norm, args.precision)
    ds_config = eng.resolve_ds_config(args.ds_config, settings)
    eng.check_precision_supported(args.precision)
    if args.resume:  # the bank and the data position follow any world size (re-sharded on load)
        eng.check_resume(os.path.join(args.output_dir, "checkpoints"), world, reshardable=True)
    if args.perturb and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise UserError(f"{args.ds_config}: gradient perturbation needs dL/de, which ZeRO-3's module hooks hide "
                        "from autograd in this DeepSpeed version; use ZeRO-1/2 (ds_configs/z2.json) or --perturb false")

    teacher_cfg = load_config(args.teacher, "teacher")
    check_encoder(teacher_cfg, args.teacher, "teacher")
    tokenizer = load_tokenizer(args.teacher)
    if args.student:
        scfg = load_config(args.student, "student")
        check_encoder(scfg, args.student, "student")
    else:
        scfg = student_config(teacher_cfg, StudentShape(args.student_layers, args.student_hidden,
                                                        args.student_intermediate, args.student_heads))
    if scfg.vocab_size != teacher_cfg.vocab_size or len(tokenizer) > scfg.vocab_size:
        raise UserError(f"student vocabulary ({scfg.vocab_size}) does not match the teacher's "
                        f"({teacher_cfg.vocab_size}, tokenizer {len(tokenizer)})")
    for role, cfg in (("teacher", teacher_cfg), ("student", scfg)):
        positions = getattr(cfg, "max_position_embeddings", args.max_seq_length)
        if args.max_seq_length > positions:
            raise UserError(f"--max_seq_length {args.max_seq_length} exceeds the {role}'s {positions} positions")
    layer_map = parse_layer_map(args.layer_map, scfg.num_hidden_layers, teacher_cfg.num_hidden_layers)

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
    bank_bytes = 0
    if args.negatives == "bank":
        probe = MemoryBank(len(layer_map), args.bank_size, bank_dim, rank, world, DTYPES[args.bank_dtype],
                           device="meta")  # checks size vs world size without allocating
        probe.validate(args.num_negatives, settings.global_batch_size)
        bank_bytes = probe.bytes_per_rank()
    return Prepared(ds_config, teacher_cfg, scfg, tokenizer, layer_map, corpus, total_steps, bank_dim, bank_bytes)


# ------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    with eng.Preemption() as preemption:  # first: a signal during start-up must not kill the job
        try:
            args = parse_flags(argv)
            prepared = setup(args)
        except UserError as exc:
            if eng.env_rank() == 0:
                eng.print_error(str(exc))
            return 2
        return eng.run_training(train, args, prepared, preemption)


def train(args: PretrainArgs, p: Prepared, preemption: eng.Preemption, *, guards: dict) -> None:
    eng.init_distributed(args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
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
    batches = RankBatches(p.corpus, args.micro_batch_size, rank, world, args.seed)
    global_micro_batch = args.micro_batch_size * world

    # ---- models
    from transformers import AutoModel

    dtype = DTYPES[args.precision]
    teacher = freeze(AutoModel.from_pretrained(args.teacher)).to(device=device, dtype=dtype)
    student_hf = AutoModel.from_pretrained(args.student) if args.student else AutoModel.from_config(p.student_cfg)
    if getattr(student_hf, "pooler", None) is not None:
        student_hf.pooler.requires_grad_(False)  # no COS-NCE gradient reaches it: keep it out of ZeRO's buckets
    module = DistillStudent(student_hf, [s for s, _ in p.layer_map], p.teacher_cfg.hidden_size)
    bank = None
    if args.negatives == "bank":
        bank = MemoryBank(len(p.layer_map), args.bank_size, p.bank_dim, rank, world, DTYPES[args.bank_dtype],
                          device, seed=args.seed)
    if main_rank:
        print(f"LRC-BERT general distillation: {len(p.corpus)} sequences ({len(batches)} micro-batches of "
              f"{global_micro_batch} per epoch), {p.total_steps} steps, global batch "
              f"{p.ds_config['train_batch_size']}, world {world}, {args.precision}, "
              f"ZeRO-{p.ds_config.get('zero_optimization', {}).get('stage', 0)}")
        print(f"student: {count_parameters(student_hf) / 1e6:.1f}M parameters; teacher: "
              f"{count_parameters(teacher) / 1e6:.1f}M")
        print(format_layer_map(p.layer_map, p.student_cfg.hidden_size, p.teacher_cfg.hidden_size))
        if bank is not None:
            print(f"memory bank: {args.bank_size} x {len(p.layer_map)} layers x {p.bank_dim} {args.bank_dtype}, "
                  f"{p.bank_bytes_per_rank / 2**20:.1f} MiB per rank; K = {args.num_negatives}")

    # ---- engine
    warmup_steps = warmup_steps_from(args.warmup, p.total_steps)
    optimizer = eng.build_optimizer(module, args.learning_rate, args.weight_decay)
    engine = eng.Engine(module, optimizer, warmup_linear_decay(warmup_steps, p.total_steps), p.ds_config)
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (initial weights came from rank 0)
    ckpt_dir = os.path.join(out, "checkpoints")
    micro_step = 0
    if args.resume:
        state = engine.load(ckpt_dir)
        micro_step = int(state["micro_step"])
        batches.load_state_dict(data_position(state, global_micro_batch, len(batches)))
        if bank is not None:
            load_bank(bank, state["rank_state_files"], rank, world)
        if main_rank:
            print(f"resumed from step {engine.global_steps} (world {state.get('world_size')} -> {world})")
            eng.Preemption.clear_mark(out)

    objective = LRCObjective(p.layer_map, ObjectiveConfig(args.pooling, "cos_nce", args.num_negatives))
    monitor = Monitor(os.path.join(out, "tensorboard"), p.total_steps, engine.global_steps, main_rank,
                      desc="general distillation")

    def client_state():
        data = dict(batches.state_dict(), global_micro_batch=global_micro_batch)
        return {"micro_step": micro_step, "data": data, "args": asdict(args), "total_steps": p.total_steps}

    def save(step):
        rank_state = {"bank": {k: v.cpu() for k, v in bank.state_dict().items()}} if bank is not None else None
        engine.save(ckpt_dir, step, client_state(), args.keep_checkpoints, rank_state=rank_state)

    # ---- train
    stream = forever(batches)
    pending = []  # this step's (teacher vectors, rows): enqueued into the bank after the step
    start_step, start_time = engine.global_steps, time.perf_counter()
    engine.train()
    while engine.global_steps < p.total_steps:
        use_bank = bank is not None and bank.ready(args.num_negatives)
        batch = {k: v.to(device) for k, v in next(stream).items()}
        loss, logs, t_vectors = distill_loss(args, engine, objective, teacher, bank if use_bank else None,
                                             batch, micro_step, rank, p.bank_dim)
        eng.check_finite_loss(loss, engine.global_steps, micro_step, batch["rows"].tolist,
                              what="corpus sequences")
        engine.backward(loss)
        engine.step()
        micro_step += 1
        if bank is not None:  # zero-padded to max_seq_length tokens, stored compactly until the step is done
            pending.append(([F.pad(v, (0, p.bank_dim - v.shape[1])).to(bank.vectors.dtype) for v in t_vectors],
                            batch["rows"]))
        monitor.accumulate(logs, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))
        if micro_step % args.gradient_accumulation_steps:
            continue
        for vectors, rows in pending:
            bank.enqueue(vectors, rows)
        pending.clear()
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
        if args.save_steps > 0 and done % args.save_steps == 0 and done < p.total_steps:
            save(done)
        stop = 0 < args.stop_after_steps <= done < p.total_steps
        preempted = preemption.agreed(device) and done < p.total_steps
        if stop or preempted:
            if args.save_steps <= 0 or done % args.save_steps:
                save(done)
            if main_rank:
                if preempted:
                    eng.Preemption.mark(out, done, p.total_steps)
                print(f"{'preempted' if preempted else 'stopped'} after step {done} of {p.total_steps}; "
                      "continue with --resume")
            monitor.close()
            guards["watchdog"].stop()  # the ranks now leave at slightly different times
            eng.barrier()
            return

    # ---- save
    elapsed = time.perf_counter() - start_time
    save(engine.global_steps)
    state = engine.full_state_dict()
    if main_rank:
        export_hf(state, "model.", student_hf.config, p.tokenizer, os.path.join(out, "model"), with_head=False)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        samples = (engine.global_steps - start_step) * p.ds_config["train_batch_size"]
        print(json.dumps({"steps": engine.global_steps, "samples_per_sec": round(samples / max(elapsed, 1e-9), 2),
                          "bank_bytes_per_rank": p.bank_bytes_per_rank, "model": os.path.join(out, "model")}))
    monitor.close()
    guards["watchdog"].stop()
    eng.barrier()


def forever(batches: RankBatches):
    """This rank's micro-batches, epoch after epoch (the position lives in ``batches``)."""
    while True:
        yield from batches


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


def distill_loss(args, engine, objective, teacher, bank, batch, micro_step, rank, bank_dim):
    """One micro-step: teacher once, the student twice with perturbation.

    Returns (loss, logs, teacher vectors): the pooled teacher vectors, per layer (B, T * d'), for the bank.
    """
    _, t_hidden = teacher_forward(teacher, batch)
    mask = batch["attention_mask"]
    t_vectors = objective.teacher_vectors(t_hidden, mask)  # per layer (B, T * d') fp32
    if bank is not None:
        k = args.num_negatives

        def negatives(student_vectors):
            padded = [F.pad(z, (0, bank_dim - z.shape[1])) for z in student_vectors]  # (B, bank_dim)
            # a fresh generator per call: the clean and perturbed passes draw the same slots
            return bank.negative_distance_sums(padded, batch["rows"], k, bank.make_generator(micro_step))
    else:
        negatives = objective.batch_negatives(t_vectors, negative_generator(args.seed, micro_step, rank))

    def loss_of(forward=engine, delta=None):
        _, _, s_embed, projected = forward(batch["input_ids"], mask, batch["token_type_ids"], delta)
        total, logs = objective(COS_ONLY, mask, projected, t_hidden, t_vectors, negatives)
        return total, logs, s_embed

    if not args.perturb:
        return (*loss_of()[:2], t_vectors)
    loss, logs = perturbed_loss(loss_of, engine, engine.module, args.epsilon, engine.loss_scale, args.perturb_mode)
    return loss, logs, t_vectors

if __name__ == "__main__":
    sys.exit(main())
