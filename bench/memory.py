"""Memory and communication: the sharded bank, ZeRO 0/1/2/3 peak memory, bytes moved per step.

    python bench/memory.py [--json] [--quick] [--stages 0,1,2,3]

1. Bank bytes per rank (``MemoryBank.bytes_per_rank`` on the meta device) at world 1 and 2
   (and 8, 512) in the general-distillation setting: 4 mapped layers, 4096 slots, flatten
   pooling of 128 tokens x 768 (BERT-base teacher), fp16. The vector shard is exactly
   1/world; the example ids (8 bytes a slot) are replicated.
2. Peak RSS per rank for ZeRO stages 0..3 (``ds_configs/zN.json``) in a two-rank CPU run
   through the real ``deepspeed`` launcher (``bench/dist_memory.py``: the default student
   + projections trained by ``lrcbert.runtime.engine.Engine``, fp32, bank negatives).
3. A model of the bytes each rank moves per step, from 8 to 512 ranks, checked against the
   payloads counted in the two-rank run (every collective wrapped and measured).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from bench.common import REPO, Report, base_parser, free_port  # noqa: E402
from lrcbert.method.bank import MemoryBank  # noqa: E402

WORLDS = (1, 2, 8, 64, 512)
GENERAL = {"layers": 4, "bank_size": 4096, "seq": 128, "teacher_width": 768, "micro_batch": 32}


def bank_bytes(layers: int, size: int, dim: int, world: int) -> dict:
    """Per-rank bytes of a bank shard, built on the meta device (no memory used)."""
    bank = MemoryBank(layers, size, dim, rank=0, world_size=world, dtype=torch.float16, device="meta")
    vectors = bank.vectors.numel() * bank.vectors.element_size()
    return {"world_size": world, "bytes_per_rank": bank.bytes_per_rank(), "vector_bytes_per_rank": vectors,
            "replicated_bytes_per_rank": bank.bytes_per_rank() - vectors}


# ------------------------------------------------------------------ the model of bytes moved

def bank_payload(world: int, micro_batch: int, layers: int, dim: int, passes: int = 1, enqueue: bool = True) -> dict:
    """Logical payload per rank per step of the bank's collectives (what each rank receives):
    one draw per micro-batch (the batch sizes and example ids all-gathered, then this rank's
    rows' direction sums, fp32, by all_to_all_single) and, per step, the enqueue's gathers of
    sizes and ids (the vectors stay where they were produced). Scoring a pass is local, so
    ``passes`` changes nothing; only the ids (8 bytes a global row) grow with the world size."""
    rows = micro_batch * world
    ids = rows * 8 + world * 8
    out = {"all_gather": ids, "all_to_all_single": layers * micro_batch * dim * 4}
    if enqueue:
        out["all_gather"] += ids
    return out


def batch_negatives_payload(world: int, micro_batch: int, layers: int, dim: int, k: int = 15) -> dict:
    """Per rank per micro-batch, upper bound: sizes and widths all-gathered, then at most
    c = min(W, ceil((K + 1) / B)) partial direction sums per own row (all_to_all_single)."""
    owners = min(world, -(-(k + 1) // micro_batch))
    return {"all_gather": world * (layers + 1) * 8, "all_to_all_single": owners * layers * micro_batch * dim * 4}


# logical payload per step in units of (trained parameters x 4 bytes), as DeepSpeed 0.19 ran
# each stage here (fp32, gloo): stage 0 all-reduces gradients; stages 1-2 all-reduce gradients
# and all-gather the updated partitions; stage 3 all-gathers parameters and reduce-scatters
# gradients (a second all-gather in backward where parameters are not kept, large models)
ZERO_PAYLOAD = {0: {"all_reduce": 1.0}, 1: {"all_reduce": 1.0, "all_gather_into_tensor": 1.0},
                2: {"all_reduce": 1.0, "all_gather_into_tensor": 1.0},
                3: {"all_gather_into_tensor": 1.0, "reduce_scatter_tensor": 1.0}}
# bytes on the wire per rank per payload byte with ring algorithms
RING = {"all_reduce": lambda w: 2 * (w - 1) / w, "all_gather": lambda w: (w - 1) / w,
        "all_gather_into_tensor": lambda w: (w - 1) / w, "reduce_scatter_tensor": lambda w: (w - 1) / w,
        "all_to_all": lambda w: (w - 1) / w,
        "all_to_all_single": lambda w: (w - 1) / w, "scatter": lambda w: (w - 1) / w, "broadcast": lambda w: 1.0 if w > 1 else 0.0}


def zero_payload(stage: int, n_params: int, bytes_per_value: int = 4) -> dict:
    return {op: coef * n_params * bytes_per_value for op, coef in ZERO_PAYLOAD[stage].items()}


def wire_bytes(payload: dict, world: int) -> float:
    return sum(RING.get(op, lambda w: 1.0)(world) * b for op, b in payload.items())


def default_trained_parameters(teacher_width: int) -> int:
    """Parameters DeepSpeed trains for the default student: the model plus its 4 projections."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    from lrcbert.models import StudentShape, count_parameters, student_config, with_labels

    base = BertConfig(vocab_size=30522, hidden_size=teacher_width, num_attention_heads=12)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(with_labels(student_config(base, StudentShape()),
                                                                           ["a", "b"]))
    return count_parameters(model) + StudentShape().num_layers * StudentShape().hidden_size * teacher_width


# ------------------------------------------------------------------ the two-rank run

def launch_two_ranks(stage: int, out_dir: str, extra: list[str], timeout: int) -> list[dict]:
    """``deepspeed --num_gpus 2 bench/dist_memory.py`` in its own process group; the ranks' records."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "bench" / "dist_memory.py"),
           "--ds_config", str(REPO / "ds_configs" / f"z{stage}.json"), "--out_dir", out_dir, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"ZeRO-{stage} two-rank run exceeded {timeout} s") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"ZeRO-{stage} two-rank run failed (rc {proc.returncode}):\n{out[-3000:]}")
    records = []
    for rank in range(2):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            records.append(json.load(f))
    return records


def plot(report: Report, stages: list[dict], scaling: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"ZeRO-{s['zero_stage']}" for s in stages]
    for i, rank in enumerate((0, 1)):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(stages))]
        bars = left.bar(xs, [s["ranks"][rank]["rss_peak_mib"] for s in stages], 0.38, label=f"rank {rank}")
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(stages)), labels)
    left.set_ylabel("peak RSS (MiB)")
    left.set_title("Two CPU ranks, default student, fp32", fontsize=10)
    left.legend(fontsize=8)
    worlds = [row["world_size"] for row in scaling]
    for key, label in (("bank_wire_bytes", "bank (2 passes + enqueue)"),
                       ("batch_negatives_wire_bytes", "batch negatives (task distillation)")):
        right.plot(worlds, [row[key] / 2**20 for row in scaling], marker="o", label=label)
    for stage in (0, 2, 3):
        right.plot(worlds, [row[f"zero{stage}_wire_bytes"] / 2**20 for row in scaling], marker=".",
                   linestyle="--", label=f"ZeRO-{stage}")
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("ranks")
    right.set_ylabel("MiB on the wire per rank per step")
    right.set_title("Model: general distillation, micro batch 32, seq 128, d'=768", fontsize=10)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report.path(".png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to run with two ranks")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per two-rank run")
    args = parser.parse_args(argv)
    report = Report("memory", args)
    stages = [int(s) for s in args.stages.split(",")] if not args.quick else [2]
    g = GENERAL
    dim = g["seq"] * g["teacher_width"]

    # 1. bank bytes per rank
    banks = [bank_bytes(g["layers"], g["bank_size"], dim, w) for w in WORLDS]
    base = banks[0]["vector_bytes_per_rank"]
    for row in banks:
        row["vector_fraction_of_world1"] = row["vector_bytes_per_rank"] / base
        row["exactly_one_over_world"] = row["vector_bytes_per_rank"] * row["world_size"] == base
    report.data["bank"] = {"setting": {**g, "dim": dim, "dtype": "fp16"}, "per_world": banks}
    report.say(f"bank: {g['layers']} layers x {g['bank_size']} slots x {dim} fp16")
    for row in banks:
        report.say(f"  world {row['world_size']:>3}: {row['bytes_per_rank'] / 2**20:10.2f} MiB per rank "
                   f"(vectors {row['vector_bytes_per_rank'] / 2**20:.2f} MiB = 1/{row['world_size']} exactly: "
                   f"{row['exactly_one_over_world']}; replicated ids {row['replicated_bytes_per_rank'] / 1024:.0f} KiB)")

    # 2. two-rank ZeRO runs
    run = {"micro_batch_size": 16, "max_seq_length": 128, "teacher_width": 768, "bank_size": 256, "steps": 3}
    extra = []
    if args.quick:
        # a 32-slot bank: two groups of 16 slots, more than K = 15
        run = {"micro_batch_size": 4, "max_seq_length": 16, "teacher_width": 64, "bank_size": 32, "steps": 2}
        extra = ["--tiny"]
    extra += [f"--{k}={v}" for k, v in run.items()]
    tmp = tempfile.mkdtemp(prefix="lrcbert-memory-bench-")
    results = []
    try:
        for stage in stages:
            records = launch_two_ranks(stage, os.path.join(tmp, f"z{stage}"), extra, args.timeout)
            ranks = [{"rank": r["rank"], "rss_peak_mib": r["rss_peak_kib"] / 1024,
                      "rss_before_model_mib": r["rss_before_model_kib"] / 1024,
                      "param_bytes_local": r["param_bytes_local"],
                      "optimizer_state_bytes_local": r["optimizer_state_bytes_local"],
                      "bank_bytes_local": r["bank_bytes_local"],
                      "collective_payload_bytes_last_step": r["collective_payload_bytes_last_step"]}
                     for r in records]
            results.append({"zero_stage": stage, "parameters": records[0]["parameters"], "ranks": ranks,
                            "bank_dim": records[0]["bank_dim"], "layers": records[0]["num_layers_mapped"]})
            report.say(f"ZeRO-{stage}: " + "; ".join(
                f"rank {x['rank']} peak RSS {x['rss_peak_mib']:.0f} MiB (before model {x['rss_before_model_mib']:.0f}), "
                f"params {x['param_bytes_local'] / 2**20:.1f} MiB, optimizer states "
                f"{x['optimizer_state_bytes_local'] / 2**20:.1f} MiB, bank {x['bank_bytes_local'] / 2**20:.1f} MiB"
                for x in ranks))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.data["two_rank_run"] = {"settings": run, "precision": "fp32", "stages": results}

    # 3. the model, checked against the counted payloads of the two-rank run
    checks = []
    for res in results:
        counted = res["ranks"][0]["collective_payload_bytes_last_step"]
        model_bank = bank_payload(2, run["micro_batch_size"], res["layers"], res["bank_dim"])
        model_zero = zero_payload(res["zero_stage"], res["parameters"])
        measured_bank = sum(counted.get("bank", {}).values())
        measured_zero = sum(counted.get("engine", {}).values())
        checks.append({"zero_stage": res["zero_stage"], "bank_model_bytes": sum(model_bank.values()),
                       "bank_measured_bytes": measured_bank, "zero_model_bytes": sum(model_zero.values()),
                       "zero_measured_bytes": measured_zero,
                       "bank_measured_over_model": measured_bank / sum(model_bank.values()),
                       "zero_measured_over_model": measured_zero / sum(model_zero.values())})
        report.say(f"payload check ZeRO-{res['zero_stage']} (one pass, world 2): bank measured/model "
                   f"x{checks[-1]['bank_measured_over_model']:.3f}, ZeRO measured/model "
                   f"x{checks[-1]['zero_measured_over_model']:.3f}")
    n_student = default_trained_parameters(g["teacher_width"])
    scaling = []
    for world in (2, 8, 64, 512):
        bank = bank_payload(world, g["micro_batch"], g["layers"], dim, passes=2)  # clean + perturbed pass
        batch_neg = batch_negatives_payload(world, g["micro_batch"], g["layers"], dim)
        row = {"world_size": world, "bank_payload_bytes": sum(bank.values()), "bank_wire_bytes": wire_bytes(bank, world),
               "batch_negatives_wire_bytes": wire_bytes(batch_neg, world)}
        for stage in range(4):
            row[f"zero{stage}_wire_bytes"] = wire_bytes(zero_payload(stage, n_student), world)
        scaling.append(row)
    report.data["model"] = {"trained_parameters": n_student, "checks_two_rank": checks, "scaling": scaling,
                            "setting": {**g, "dim": dim, "passes_per_step": 2}}
    report.say(f"model, per rank per step ({n_student / 1e6:.1f}M trained parameters, micro batch {g['micro_batch']}):")
    for row in scaling:
        report.say(f"  {row['world_size']:>4} ranks: bank {row['bank_wire_bytes'] / 2**30:8.2f} GiB, "
                   f"batch negatives {row['batch_negatives_wire_bytes'] / 2**30:7.2f} GiB, ZeRO-0/2/3 "
                   f"{row['zero0_wire_bytes'] / 2**20:.0f}/{row['zero2_wire_bytes'] / 2**20:.0f}/"
                   f"{row['zero3_wire_bytes'] / 2**20:.0f} MiB")
    report.finish(plot=(lambda: plot(report, results, scaling)) if results else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
