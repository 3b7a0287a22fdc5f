"""Inference speed: the default LRC-BERT student against a BERT-base-config teacher.

    python bench/inference_speed.py [--json] [--quick] [--compile] [--device cuda] [--fp16]

Both models are saved as Hugging Face directories and loaded the way a user of an
exported student loads one (``AutoModelForSequenceClassification.from_pretrained``), random
weights (timing only). Settings: sequence length 128 at batch 32 and at batch 1, and
real-length batches of SST-2 dev sentences. Two paths, each timed for teacher and student
interleaved in one loop (median of repeats):

- ``plain``: eager attention, ``torch.no_grad``, batches in data order padded to their
  longest row (what a first script does);
- ``fast``: ``lrcbert.inference`` (SDPA attention, ``torch.inference_mode``, length-bucketed
  batches, no attention mask when nothing is padded);
- ``fast_bf16``: the fast path with bf16 weights and activations (this CPU has AVX512-BF16);
- ``fast_fp16`` (with ``--fp16``): the fast path in fp16 (for GPUs; CPUs without AVX512-FP16 run
  it slowly);
- ``compiled`` (with ``--compile``): the fast path under ``torch.compile``;
- ``onnx_fp32`` and ``onnx_int8``: the models exported by ``lrcbert.export`` (``lrcbert-export``)
  and run by ONNX Runtime with the same length-bucketed batches and as many threads as torch
  (skipped with ``--no_onnx`` or without onnxruntime). ``int8_student_over_pytorch_student`` is
  the int8 student's speed over the fp32 PyTorch fast path's student.

``--device cuda`` runs every PyTorch path on the GPU (batches are moved there; each timed pass
ends with ``torch.cuda.synchronize``) and skips ONNX Runtime; ``--batch_size`` sets the big
batch (a GPU wants more than 32 rows).

FLOPs are counted analytically (matmuls only: 2 * weights per token plus attention
4 * T * d per token per layer), parameters with ``numel``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench.common import SHARED_DATA, Report, base_parser, median_ms, plot_bars, tokenizer_dir  # noqa: E402
from lrcbert.data import glue  # noqa: E402
from lrcbert.inference import load_classifier_for_inference, predict_encoded  # noqa: E402
from lrcbert.models import StudentShape, count_parameters, student_config, with_labels  # noqa: E402

GOAL_SPEEDUP = 16.0
GOAL_SPEEDUP_BATCH1 = 14.0  # same-runtime student/teacher at batch 1
GOAL_INT8_OVER_PYTORCH = 2.0  # the int8 ONNX student against the fp32 PyTorch student


def encoder_flops(config, lengths: list[int]) -> float:
    """Forward matmul FLOPs of the encoder (+ pooler and head) over sequences of these lengths."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token_linear = layers * 2 * (4 * d * d + 2 * d * ff)
    total = 0.0
    for t in lengths:
        total += t * per_token_linear + layers * 4 * t * t * d  # QK^T and AV: 2 * 2 * T * d per token
        total += 2 * (d * d + d * config.num_labels)  # pooler and classifier on [CLS]
    return total


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnxscript"))


TINY_TEACHER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TINY_STUDENT = StudentShape(2, 32, 64, 4)


def save_models(tmp: str, tiny: bool = False) -> tuple[str, str]:
    """A BERT-base-config teacher and the default student, as Hugging Face dirs (random weights);
    ``tiny``: a 2 x 64 teacher and a 2 x 32 student (a smoke test of the paths, no speed figure)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
    labels = ["negative", "positive"]
    # BERT-base: 12 x 768, 3072 FFN, 12 heads
    teacher_cfg = BertConfig(vocab_size=tokenizer.vocab_size, **(TINY_TEACHER if tiny else {}))
    dirs = []
    shape = TINY_STUDENT if tiny else StudentShape()
    for name, cfg in (("teacher", teacher_cfg), ("student", student_config(teacher_cfg, shape))):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(with_labels(cfg, labels))
        path = os.path.join(tmp, name)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


def plain_predict(model, input_ids, pad_id: int, batch_size: int) -> None:
    """Batches in data order, padded to their longest row, attention mask always passed."""
    device = model.device
    with torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            rows = input_ids[start:start + batch_size]
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            ids, mask = ids.to(device), mask.to(device)
            model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def settings_for(args, tokenizer) -> list[dict]:
    """Each setting: name, the token-id rows, batch size."""
    seq, big = (16, 2) if args.quick else (128, args.batch_size)
    gen = torch.Generator().manual_seed(0)
    fixed = lambda n: torch.randint(1000, 29000, (n, seq), generator=gen).tolist()  # noqa: E731
    task = glue.get_task("sst2")
    dev = glue.read_split(task, SHARED_DATA / "GLUE" / "SST-2", "dev")
    n = 8 if args.quick else args.sst2_samples
    real = tokenizer(dev.text_a[:n], truncation=True, max_length=128)["input_ids"]
    return [{"name": f"seq{seq}_batch{big}", "rows": fixed(big), "batch_size": big},
            {"name": f"seq{seq}_batch1", "rows": fixed(1), "batch_size": 1},
            {"name": f"sst2_dev{n}_batch{big}", "rows": real, "batch_size": big}]


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting and model (median)")
    parser.add_argument("--sst2_samples", type=int, default=256, help="first N SST-2 dev sentences")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    parser.add_argument("--no_bf16", action="store_true", help="skip the bf16 fast path")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--no_onnx", action="store_true", help="skip the ONNX Runtime fp32/int8 paths")
    parser.add_argument("--fp16", action="store_true", help="also time the fast path in fp16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the PyTorch paths run (cuda: ONNX Runtime is skipped)")
    parser.add_argument("--batch_size", type=int, default=32, help="the big batch's rows (seq 128)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (2 x 64 teacher, 2 x 32 student): "
                        "checks the paths, measures nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to PyTorch")
    hf_logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    report = Report("inference_speed", args)
    tmp = tempfile.mkdtemp(prefix="lrcbert-bench-")
    try:
        return measure(args, report, repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, report: Report, repeats: int, tmp: str) -> int:
    teacher_dir, student_dir = save_models(tmp, args.tiny)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = tokenizer.pad_token_id

    models = {"plain": {}, "fast": {}}
    device = torch.device(args.device)
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        models["plain"][role] = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="eager").eval().to(device)
        models["fast"][role] = load_classifier_for_inference(path).to(device)
    for name, dtype, wanted in (("fast_bf16", torch.bfloat16, not args.no_bf16), ("fast_fp16", torch.float16, args.fp16)):
        if wanted:
            models[name] = {role: load_classifier_for_inference(p, dtype=dtype).to(device)
                            for role, p in (("teacher", teacher_dir), ("student", student_dir))}
    if args.compile:
        models["compiled"] = {role: load_classifier_for_inference(p) for role, p in (("teacher", teacher_dir),
                                                                                      ("student", student_dir))}
        for model in models["compiled"].values():
            model.forward = torch.compile(model.forward, dynamic=True)
    if not args.no_onnx and args.device == "cpu" and onnx_available():
        from lrcbert.export import OnnxClassifier, export_onnx, quantize_int8

        for role, path in (("teacher", teacher_dir), ("student", student_dir)):
            paths = export_onnx(path, os.path.join(tmp, f"{role}_onnx"))
            quantize_int8(paths.fp32, paths.int8)
            threads = torch.get_num_threads()
            models.setdefault("onnx_fp32", {})[role] = OnnxClassifier(paths.fp32, threads)
            models.setdefault("onnx_int8", {})[role] = OnnxClassifier(paths.int8, threads)
    t_cfg, s_cfg = AutoConfig.from_pretrained(teacher_dir), AutoConfig.from_pretrained(student_dir)
    t_params, s_params = count_parameters(models["fast"]["teacher"]), count_parameters(models["fast"]["student"])
    report.data.update({"teacher": {"config": "tiny (2x64, 128, 4 heads)" if args.tiny else
                                    "bert-base (12x768, 3072, 12 heads)", "parameters": t_params},
                        "student": {"config": "tiny (2x32, 64, 4 heads)" if args.tiny else "4x312, 1200, 12 heads",
                                    "parameters": s_params},
                        "param_ratio": t_params / s_params, "repeats": repeats, "threads": torch.get_num_threads(),
                        "device": args.device})
    report.say(f"teacher {t_params / 1e6:.1f}M parameters, student {s_params / 1e6:.1f}M "
               f"(x{t_params / s_params:.2f} smaller); {torch.get_num_threads()} threads, {repeats} repeats")

    def run(path: str, role: str, setting: dict):
        if args.device == "cuda":  # the GPU works asynchronously: a pass ends when its kernels are done
            fn = run_async(path, role, setting)
            return lambda: (fn(), torch.cuda.synchronize())
        return run_async(path, role, setting)

    def run_async(path: str, role: str, setting: dict):
        model = models[path][role]
        if path == "plain":
            return lambda: plain_predict(model, setting["rows"], pad_id, setting["batch_size"])
        if path.startswith("onnx"):
            return lambda: model.predict_encoded(setting["rows"], None, pad_id, setting["batch_size"])
        return lambda: predict_encoded(model, setting["rows"], None, pad_id, setting["batch_size"])

    results = []
    for setting in settings_for(args, tokenizer):
        lengths = [len(r) for r in setting["rows"]]
        flop_ratio = encoder_flops(t_cfg, lengths) / encoder_flops(s_cfg, lengths)
        times = {(p, r): [] for p in models for r in ("teacher", "student")}
        for fn in (run(p, r, setting) for p, r in times):  # warm-up (and compilation)
            fn()
        for _ in range(repeats):  # interleaved: load changes hit teacher and student alike
            for key in times:
                start = time.perf_counter()
                run(*key, setting)()
                times[key].append(time.perf_counter() - start)
        row = {"setting": setting["name"], "examples": len(lengths), "tokens": sum(lengths),
               "batch_size": setting["batch_size"], "flop_ratio": flop_ratio, "param_ratio": t_params / s_params}
        for p in models:
            t_ms, s_ms = median_ms(times[(p, "teacher")]), median_ms(times[(p, "student")])
            best = min(times[(p, "teacher")]) / min(times[(p, "student")])  # least disturbed by other load
            row[p] = {"teacher_ms": t_ms, "student_ms": s_ms, "speedup": t_ms / s_ms, "speedup_of_best": best,
                      "teacher_ms_all": [1e3 * x for x in times[(p, "teacher")]],
                      "student_ms_all": [1e3 * x for x in times[(p, "student")]]}
        # headline fields: the fast path (the one lrcbert.inference gives a user)
        row.update({k: row["fast"][k] for k in ("teacher_ms", "student_ms", "speedup")})
        row["fast_over_plain"] = {r: row["plain"][f"{r}_ms"] / row["fast"][f"{r}_ms"] for r in ("teacher", "student")}
        if "onnx_int8" in models:
            row["int8_student_over_pytorch_student"] = row["fast"]["student_ms"] / row["onnx_int8"]["student_ms"]
        results.append(row)
        report.say(f"{setting['name']:>22}: " + "; ".join(
            f"{p} teacher {row[p]['teacher_ms']:.1f} ms, student {row[p]['student_ms']:.1f} ms, "
            f"x{row[p]['speedup']:.2f}" for p in models) + f"; FLOP ratio x{flop_ratio:.2f}")
    report.data["settings"] = results
    report.data["goal_speedup"] = GOAL_SPEEDUP
    report.data["goal_met"] = {r["setting"]: r["speedup"] >= GOAL_SPEEDUP for r in results}
    if "onnx_int8" in models:  # the ONNX goals: same-runtime speedups and int8 over PyTorch fp32
        report.data["onnx_goals"] = {
            r["setting"]: {"same_runtime_speedup_fp32": r["onnx_fp32"]["speedup"],
                           "same_runtime_speedup_int8": r["onnx_int8"]["speedup"],
                           "goal_speedup": GOAL_SPEEDUP_BATCH1 if r["batch_size"] == 1 else GOAL_SPEEDUP,
                           "int8_student_over_pytorch_student": r["int8_student_over_pytorch_student"],
                           "goal_int8_over_pytorch": GOAL_INT8_OVER_PYTORCH} for r in results}
        for name, g in report.data["onnx_goals"].items():
            report.say(f"{name:>22}: ONNX Runtime student/teacher fp32 x{g['same_runtime_speedup_fp32']:.1f}, int8 "
                       f"x{g['same_runtime_speedup_int8']:.1f} (goal x{g['goal_speedup']:.0f}); int8 student over "
                       f"PyTorch fp32 student x{g['int8_student_over_pytorch_student']:.2f} (goal x2)")
    series = {**{f"{p} speedup": [r[p]["speedup"] for r in results] for p in models},
              "FLOP ratio": [r["flop_ratio"] for r in results]}
    report.finish(plot=lambda: plot_bars(report.path(".png"), "Teacher / student time (higher = student faster)",
                                         [r["setting"] for r in results], series, "speedup (x)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
