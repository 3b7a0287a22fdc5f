"""The GPU check: CUDA tests, general-distillation throughput and MFU, inference speed, peak memory.

    python bench/gpu_check.py [--dry-run] [--out FILE]

Run by ``bash bench/gpu_check.sh --run`` on the GPU machine (after the kit's wheels are
installed), and by ``--dry-run`` on a CPU, which walks the same steps at tiny sizes and writes
the same JSON shape with ``"dry_run": true``. Steps, each through the project's own entry points:

1. ``pytest -m cuda tests/test_cuda.py`` in a subprocess; outcomes from its JUnit XML.
2. General distillation, once per precision (bf16, fp16) and micro-batch size: the real recipe
   ``pretrain/general_distill.py`` (DeepSpeed ZeRO-2 over NCCL, one rank as srun or torchrun
   would start it: ranks from the environment) with a random-weight BERT-base-config teacher
   (12 x 768, 3072 FFN) and the default 4 x 312 student, seq 128, bank negatives (K = 15) and
   gradient perturbation, on a corpus that ``prepare_corpus`` builds from WikiText-2. Samples/s
   and tokens/s are the recipe's own TensorBoard scalars (``perf/*``, per logging interval): the
   median of the intervals once the bank serves the negatives, the first interval (start-up)
   left out. Peak GPU memory is the recipe's closing line (``torch.cuda.max_memory_*``).
3. Inference: ``bench/inference_speed.py --device cuda --fp16`` (teacher and student, plain
   and fast paths in fp32, bf16 and fp16).

MFU = achieved model FLOP/s / peak. Model FLOPs per sample of T tokens (matmuls only, as
``bench/inference_speed.encoder_flops`` counts them: 2 x weights per token + 4 T d per token
per layer for attention):
    teacher forward F_t  +  5 x student forward F_s,
F_s including the projections W_i (2 x 312 x 768 per token per mapped layer). The 5: the clean
pass (1 forward) and its dL/de (a backward to the embeddings: activation gradients only, about
1 forward), then the perturbed pass's forward (1) and full backward (2). Not counted: the COS-NCE
cosines (2 (K + 2) T d_t per layer, under 0.1%), the optimizer, the bank. Peak: 989 TFLOP/s,
the H200's dense bf16/fp16 tensor-core figure (NVIDIA's data sheet; 8192^3 bf16 matmuls reached
about 790 here, KINDS.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.common import REPO, SHARED_DATA, free_port, machine, read_scalars, tokenizer_dir  # noqa: E402

PEAK_TFLOPS = 989.0
PEAK_SOURCE = "H200 dense bf16/fp16 tensor-core peak, NVIDIA data sheet (989 TFLOP/s without sparsity)"
FLOPS_FORMULA = ("per sample of T tokens: teacher forward F_t + 5 x student forward F_s (clean forward, its "
                 "dL/de backward ~1 forward, perturbed forward, full backward 2 forwards); F = matmul FLOPs: "
                 "layers * T * 2 * (4 d^2 + 2 d ff) + layers * 4 T^2 d (+ pooler, head on [CLS]); F_s adds the "
                 "projections W_i: mapped layers * T * 2 * d_s * d_t")
PRECISIONS = ("bf16", "fp16")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ FLOPs

def distill_flops_per_sample(teacher_cfg, student_cfg, seq: int, mapped_layers: int) -> dict:
    from bench.inference_speed import encoder_flops

    teacher = encoder_flops(teacher_cfg, [seq])
    student = encoder_flops(student_cfg, [seq]) + mapped_layers * seq * 2 * student_cfg.hidden_size * teacher_cfg.hidden_size
    return {"teacher_forward": teacher, "student_forward": student, "total": teacher + 5 * student}


# ------------------------------------------------------------------------------------ 1. CUDA tests

def cuda_tests(out_dir: Path, timeout_s: int) -> dict:
    xml = out_dir / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    say("+ " + " ".join(cmd))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return {"command": " ".join(cmd[1:]), "timed_out": True, "timeout_s": timeout_s,
                "output_tail": ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                                else (exc.stdout or ""))[-3000:]}
    result = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
              "passed": 0, "failed": 0, "skipped": 0, "tests": []}
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", (child.get("message") or "")[:500]
                elif child.tag == "skipped":
                    outcome, message = "skipped", (child.get("message") or "")[:200]
            result[outcome] += 1
            result["tests"].append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                                    **({"message": message} if message else {})})
    if proc.returncode not in (0, 5) or result["failed"]:
        result["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    say(f"cuda tests: {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped "
        f"(exit {proc.returncode})")
    return result


# ------------------------------------------------------------------------------------ 2. general distillation

def make_teacher(path: Path, tiny: bool):
    """A random-weight BERT-base-config encoder (tiny in a dry run) with the uncased tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from bench.inference_speed import TINY_TEACHER

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    size = TINY_TEACHER if tiny else {}
    config = BertConfig(vocab_size=tok.vocab_size, **size)  # defaults: BERT-base, 12 x 768, 3072, 12 heads
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return config


def make_corpus(root: Path, seq: int, lines: int | None) -> Path:
    from lrcbert.data.corpus_build import CorpusConfig, prepare_corpus

    source = SHARED_DATA / "wikitext-2" / "wiki.test.raw"
    if lines is not None:
        with open(source, "rb") as f:
            (root / "slice.raw").write_bytes(b"".join(line for _, line in zip(range(lines), f)))
        source = root / "slice.raw"
    out = root / f"corpus{seq}"
    prepare_corpus(CorpusConfig(output_dir=str(out), tokenizer=str(root / "teacher"), input=str(source),
                                max_seq_length=seq, progress=False))
    return out


def distill_run(root: Path, teacher: Path, corpus: Path, precision: str, batch: int, s: argparse.Namespace,
                flops: dict, peak_tflops: float) -> dict:
    out = root / f"run_{precision}_b{batch}"
    args = ["--ds_config", "ds_configs/z2.json", "--teacher", str(teacher), "--corpus", str(corpus),
            "--output_dir", str(out), "--precision", precision, "--max_seq_length", str(s.seq),
            "--micro_batch_size", str(batch), "--max_steps", str(s.steps), "--log_steps", str(s.log_steps),
            "--save_steps", "0", "--negatives", "bank", "--bank_size", str(s.bank_size),
            "--num_negatives", str(s.k), "--warmup", "0.01", *s.student_flags]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "pretrain/general_distill.py", *args]
    say("+ " + " ".join(cmd[1:]))
    entry = {"precision": precision, "micro_batch_size": batch, "max_seq_length": s.seq, "steps": s.steps,
             "log_steps": s.log_steps, "command": " ".join(cmd[1:])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=s.run_timeout)
    except subprocess.TimeoutExpired:
        return {**entry, "ok": False, "error": f"timed out after {s.run_timeout} s"}
    entry["wall_s"] = round(time.perf_counter() - start, 1)
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {**entry, "ok": False, "exit_code": proc.returncode,
                "error": errors[-1] if errors else "no closing JSON line",
                "output_tail": (proc.stdout + proc.stderr)[-3000:] if not errors else ""}
    summary = json.loads(lines[-1])
    scalars = read_scalars(out / "tensorboard")
    steps = sorted(scalars["perf/samples_per_sec"])
    in_use = scalars.get("bank/in_use", {})
    steady = [st for st in steps[1:] if in_use.get(st, 0.0) == 1.0] or steps[1:] or steps
    samples = statistics.median(scalars["perf/samples_per_sec"][st] for st in steady)
    tokens = statistics.median(scalars["perf/tokens_per_sec"][st] for st in steady)
    achieved = samples * flops["total"]
    entry.update({
        "ok": True, "samples_per_s": samples, "tokens_per_s": tokens,
        "samples_per_s_per_interval": [scalars["perf/samples_per_sec"][st] for st in steps],
        "intervals_used": steady, "bank_in_use_from_step": min((st for st in steps if in_use.get(st) == 1.0),
                                                               default=None),
        "recipe_samples_per_sec_whole_run": summary.get("samples_per_sec"),
        "achieved_tflops": achieved / 1e12, "mfu": achieved / (peak_tflops * 1e12),
        "peak_gpu_memory_allocated_bytes": summary.get("peak_gpu_memory_allocated_bytes"),
        "peak_gpu_memory_reserved_bytes": summary.get("peak_gpu_memory_reserved_bytes"),
        "final_loss": scalars.get("loss/total", scalars.get("loss/cos", {})).get(steps[-1]),
        "skipped_steps": scalars.get("train/skipped_steps", {}).get(steps[-1]),
    })
    say(f"general distillation {precision}, micro-batch {batch}: {samples:,.1f} samples/s, {tokens:,.0f} tokens/s, "
        f"MFU {100 * entry['mfu']:.2f}% (intervals ending at steps {steady})")
    return entry


# ------------------------------------------------------------------------------------ 3. inference

def inference(out_dir: Path, dry_run: bool, batch: int) -> dict:
    from bench import inference_speed

    argv = ["--out_dir", str(out_dir), "--fp16", "--no_onnx"]
    argv += ["--quick", "--tiny"] if dry_run else ["--device", "cuda", "--batch_size", str(batch), "--sst2_samples", "872"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    say("+ bench/inference_speed.py " + " ".join(argv))
    start = time.perf_counter()
    code = inference_speed.main(argv)
    data = json.loads((out_dir / "inference_speed.json").read_text())
    result = {"command": "bench/inference_speed.py " + " ".join(argv), "exit_code": code,
              "wall_s": round(time.perf_counter() - start, 1), "device": data.get("device"),
              "teacher": data["teacher"], "student": data["student"], "settings": []}
    paths = [p for p in ("plain", "fast", "fast_bf16", "fast_fp16") if p in data["settings"][0]]
    for row in data["settings"]:
        entry = {"setting": row["setting"], "examples": row["examples"], "tokens": row["tokens"],
                 "batch_size": row["batch_size"], "flop_ratio": row["flop_ratio"]}
        for p in paths:
            entry[p] = {k: row[p][k] for k in ("teacher_ms", "student_ms", "speedup")}
            entry[p]["teacher_examples_per_s"] = 1e3 * row["examples"] / row[p]["teacher_ms"]
            entry[p]["student_examples_per_s"] = 1e3 * row["examples"] / row[p]["student_ms"]
        result["settings"].append(entry)
    if torch.cuda.is_available():
        result["peak_gpu_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return result


# ------------------------------------------------------------------------------------ main

def gpu_facts() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    facts = {"name": props.name, "total_memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count,
             "capability": f"{props.major}.{props.minor}", "torch_cuda": torch.version.cuda,
             "bf16_supported": torch.cuda.is_bf16_supported()}
    try:
        facts["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                              "--format=csv,noheader"], capture_output=True, text=True,
                                             timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", dest="dry_run", action="store_true",
                        help="CPU, tiny sizes: the same steps and JSON shape, no GPU needed")
    parser.add_argument("--out", help="the JSON file (default: $OUT/gpu_check.json, else bench/results/gpu_check.json; "
                        "a dry run's in the temporary folder)")
    parser.add_argument("--batch_sizes", default="32,128", help="general distillation micro-batches (32: the recipe's)")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per general-distillation run")
    parser.add_argument("--inference_batch", type=int, default=256, help="inference's big batch (seq 128)")
    parser.add_argument("--kit_report", help="the kit check's JSON report, copied into the output")
    parser.add_argument("--skip_tests", action="store_true", help="leave out step 1")
    args = parser.parse_args(argv)
    default_dir = tempfile.gettempdir() if args.dry_run else REPO / "bench" / "results"
    out = Path(args.out or os.path.join(os.environ.get("OUT") or default_dir, "gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        say("error: no CUDA GPU visible to PyTorch; use --dry-run on a CPU")
        return 2
    started = time.time()
    s = argparse.Namespace(seq=128, steps=args.steps, log_steps=10, bank_size=4096, k=15, run_timeout=300,
                           student_flags=[])
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.dry_run:  # tiny: a 2 x 64 teacher, a 2 x 32 student, seq 32, a few steps
        s = argparse.Namespace(seq=32, steps=6, log_steps=2, bank_size=64, k=3, run_timeout=300,
                               student_flags=["--student_layers", "2", "--student_hidden", "32",
                                              "--student_intermediate", "64", "--student_heads", "4",
                                              "--bank_groups", "4"])
        batches = [4]
    data: dict = {"benchmark": "gpu_check", "dry_run": args.dry_run, "machine": machine(), "gpu": gpu_facts(),
                  "data_dir": str(SHARED_DATA), "tokenizer_dir": tokenizer_dir()}
    if args.dry_run:
        data["note"] = ("dry run: CPU, tiny models, a few steps; the figures only show that every step ran, "
                        "they measure nothing (MFU is still taken against the H200's peak)")
    if args.kit_report and os.path.isfile(args.kit_report):
        data["kit"] = json.loads(Path(args.kit_report).read_text())

    def save() -> None:  # after every step: a check stopped by its time limit still leaves its figures
        data["wall_s"] = round(time.time() - started, 1)
        out.write_text(json.dumps(data, indent=2) + "\n")

    tmp = Path(tempfile.mkdtemp(prefix="lrcbert-gpu-check-"))
    try:
        data["cuda_tests"] = {"skipped": "--skip_tests"} if args.skip_tests else cuda_tests(tmp, 240)
        save()
        from transformers import AutoConfig

        from lrcbert.method.layer_map import uniform_layer_map
        from lrcbert.models import StudentShape, student_config

        teacher_dir = tmp / "teacher"
        teacher_cfg = make_teacher(teacher_dir, tiny=args.dry_run)
        shape = (StudentShape(2, 32, 64, 4) if args.dry_run else StudentShape())
        student_cfg = student_config(AutoConfig.from_pretrained(teacher_dir), shape)
        mapped = len(uniform_layer_map(student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers))
        corpus = make_corpus(tmp, s.seq, 200 if args.dry_run else None)
        flops = distill_flops_per_sample(teacher_cfg, student_cfg, s.seq, mapped)
        data["flops"] = {"formula": FLOPS_FORMULA, "per_sample": flops, "peak_tflops": PEAK_TFLOPS,
                         "peak_source": PEAK_SOURCE, "seq": s.seq, "mapped_layers": mapped}
        data["general_distillation"] = {
            "teacher": {"config": "tiny 2 x 64 (dry run)" if args.dry_run else "bert-base (12 x 768, 3072, 12 heads)",
                        "weights": "random"},
            "student": {"config": f"{shape.num_layers} x {shape.hidden_size}, {shape.intermediate_size}, "
                                  f"{shape.num_heads} heads"},
            "ds_config": "ds_configs/z2.json", "negatives": f"bank ({s.bank_size} slots, K = {s.k})",
            "perturbation": "on (replace mode, the recipe's default)", "runs": {}}
        for precision in PRECISIONS:
            for batch in batches:
                data["general_distillation"]["runs"][f"{precision}_b{batch}"] = distill_run(
                    tmp, teacher_dir, corpus, precision, batch, s, flops, PEAK_TFLOPS)
                save()
        data["inference"] = inference(tmp, args.dry_run, args.inference_batch)
        runs = data["general_distillation"]["runs"].values()
        data["peak_gpu_memory_bytes"] = {
            "general_distillation": {f"{r['precision']}_b{r['micro_batch_size']}": r.get("peak_gpu_memory_allocated_bytes")
                                     for r in runs},
            "inference": data["inference"].get("peak_gpu_memory_allocated_bytes")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        data["complete"] = "peak_gpu_memory_bytes" in data
        save()
        say(f"wrote {out}")
    tests_ok = data["cuda_tests"].get("failed", 0) == 0 and not data["cuda_tests"].get("timed_out")
    # a CPU without AVX512-FP16 refuses fp16 at start-up (the recipe's own check): expected in a dry run
    runs_ok = all(r.get("ok") or (args.dry_run and "fp16 is not supported" in r.get("error", ""))
                  for r in data["general_distillation"]["runs"].values())
    return 0 if tests_ok and runs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
