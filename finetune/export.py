"""Export a trained classifier for serving: ONNX fp32, an int8 copy, and a parity check.

    lrcbert-export runs/sst2-student/model --onnx --int8 --task sst2 --data_dir GLUE/SST-2
    python finetune/score.py --runtime onnx --model runs/sst2-student/model/onnx --task sst2 --data_dir GLUE/SST-2

Writes ``MODEL_DIR/onnx/`` (or ``--output_dir``): ``model.onnx``, with ``--int8``
``model.int8.onnx`` (ONNX Runtime dynamic quantization), the tokenizer and config, and
``parity.json``: on the task's dev split, each file's metrics, the share of predictions equal to
the PyTorch model's and the metric difference. A missed limit (``--min_agreement``,
``--max_metric_drop``; int8 has its own) is a one-line error and exit status 4; the files stay
for inspection. Without ``--task`` the parity check is skipped (said on the way out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrcbert.errors import exit_on_user_error  # noqa: E402

PARITY_FAILED = 4


def parse_args(argv=None) -> argparse.Namespace:
    from lrcbert.export import ParityLimits

    limits = ParityLimits()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="a Hugging Face classifier directory (OUTPUT_DIR/model of a recipe)")
    p.add_argument("--onnx", action="store_true", help="write model.onnx (implied by --int8)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic quantization)")
    p.add_argument("--output_dir", default=None, help="default: MODEL_DIR/onnx")
    p.add_argument("--task", default=None, help="GLUE task for the parity check")
    p.add_argument("--data_dir", default=None, help="the task's TSV folder (its dev split is scored)")
    p.add_argument("--max_eval_samples", type=int, default=-1, help="first N dev examples (-1: all)")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--min_agreement", type=float, default=limits.fp32_min_agreement, help="fp32 vs PyTorch")
    p.add_argument("--max_metric_drop", type=float, default=limits.fp32_max_metric_drop, help="fp32 vs PyTorch")
    p.add_argument("--int8_min_agreement", type=float, default=limits.int8_min_agreement)
    p.add_argument("--int8_max_metric_drop", type=float, default=limits.int8_max_metric_drop)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    args = p.parse_args(argv)
    args.onnx = args.onnx or args.int8
    if not args.onnx:
        p.error("say what to export: --onnx and/or --int8")
    if (args.task is None) != (args.data_dir is None):
        p.error("the parity check needs both --task and --data_dir")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    from lrcbert.export import ParityError, ParityLimits, check_model_dir, check_parity, describe, export_onnx, \
        quantize_int8

    out_dir = args.output_dir or os.path.join(args.model_dir, "onnx")
    try:
        check_model_dir(args.model_dir)
        if args.task:
            from lrcbert.data import glue

            glue.load_examples(glue.get_task(args.task), args.data_dir, glue.get_task(args.task).dev_splits[0], 1)
        start = time.time()
        paths = export_onnx(args.model_dir, out_dir)
        print(f"wrote {paths.fp32} ({os.path.getsize(paths.fp32) / 2**20:.1f} MiB, {time.time() - start:.0f} s)")
        if args.int8:
            quantize_int8(paths.fp32, paths.int8)
            print(f"wrote {paths.int8} ({os.path.getsize(paths.int8) / 2**20:.1f} MiB)")
        if not args.task:
            print("parity not checked: give --task and --data_dir to compare the exports with PyTorch on a dev set")
            return 0
        limits = ParityLimits(args.min_agreement, args.max_metric_drop, args.int8_min_agreement,
                              args.int8_max_metric_drop)
        report = check_parity(args.model_dir, out_dir, args.task, args.data_dir, args.max_eval_samples,
                              args.max_seq_length, limits, args.threads)
        print(describe(report))
    except ParityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return PARITY_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
