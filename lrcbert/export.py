"""Deployable exports of a trained classifier: ONNX fp32, int8, and the parity check between them.

    paths = export_onnx(model_dir, out_dir)                # out_dir/model.onnx + tokenizer + config
    quantize_int8(paths.fp32, paths.int8)                  # out_dir/model.int8.onnx
    report = check_parity(model_dir, out_dir, task, data_dir)   # agreement and metric per runtime

The graph comes from ``torch.onnx.export`` (the torch.export-based exporter, the default since
torch 2.9) of the unmodified Hugging Face model with eager attention, so that the exported
graph always applies the attention mask (the SDPA path decides at trace time whether a mask
is needed). Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, batch x
sequence, both axes dynamic); output ``logits`` (batch x labels). The int8 copy is ONNX
Runtime's own dynamic quantization (``quantize_dynamic``: int8 weights, activations quantized
per batch at run time), which needs no calibration data.

:class:`OnnxClassifier` runs either file with ONNX Runtime through the same length-bucketed
batching as the PyTorch path (``lrcbert.inference``), so scores and timings compare like for like.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lrcbert.errors import UserError
from lrcbert.files import write_json_atomic
from lrcbert.inference import length_buckets, tokenize

FP32_FILE, INT8_FILE, PARITY_FILE = "model.onnx", "model.int8.onnx", "parity.json"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class OnnxPaths:
    out_dir: str

    @property
    def fp32(self) -> str:
        return os.path.join(self.out_dir, FP32_FILE)

    @property
    def int8(self) -> str:
        return os.path.join(self.out_dir, INT8_FILE)


class _Logits(torch.nn.Module):
    """The classifier with positional inputs and the logits as its only output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def check_model_dir(model_dir: str) -> None:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json)")


def export_onnx(model_dir: str, out_dir: str, opset: int = 18) -> OnnxPaths:
    """Write ``out_dir/model.onnx`` (fp32), the tokenizer and the config (label names) beside it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_dir(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
    wrapper = _Logits(model).eval()
    example = torch.randint(1000, 2000, (2, 16))
    mask = torch.ones_like(example)
    mask[1, 11:] = 0  # a padded row in the example: the traced graph keeps the masking
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=4096)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "token_type_ids": {0: batch, 1: seq}}
    paths = OnnxPaths(out_dir)
    tmp = paths.fp32 + ".tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example, mask, torch.zeros_like(example)), tmp, input_names=list(INPUTS),
                          output_names=["logits"], dynamic_shapes=dims, opset_version=opset, dynamo=True,
                          external_data=False, verbose=False)
    os.replace(tmp, paths.fp32)
    shutil.copyfile(os.path.join(model_dir, "config.json"), os.path.join(out_dir, "config.json"))  # labels
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return paths


def quantize_int8(fp32_path: str, int8_path: str) -> str:
    """ONNX Runtime dynamic quantization: int8 weights (MatMul/Gemm), activations at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = int8_path + ".tmp.onnx"
    # (ONNX Runtime's shape pre-processing, which it suggests in a log line, cannot infer the
    # symbolic shapes of this graph; the quantization does not need it)
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    quantize_dynamic(fp32_path, tmp, weight_type=QuantType.QInt8)
    os.replace(tmp, int8_path)
    return int8_path


class OnnxClassifier:
    """An exported classifier run by ONNX Runtime (CPU), with ``num_labels`` from its config."""

    def __init__(self, path: str, threads: int = 0):
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise UserError(f"no ONNX model at {path}")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.path = path

    def logits(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["logits"], {k: batch[k] for k in INPUTS})[0]

    def predict_encoded(self, input_ids: list[list[int]], token_type_ids: list[list[int]] | None, pad_id: int,
                        batch_size: int = 64) -> np.ndarray:
        """(N, num_labels) fp32 logits in input order, from length-bucketed batches."""
        out: list[np.ndarray | None] = [None] * len(input_ids)
        for rows in length_buckets([len(ids) for ids in input_ids], batch_size):
            batch = pad_numpy([input_ids[r] for r in rows],
                              [token_type_ids[r] for r in rows] if token_type_ids is not None else None, pad_id)
            for r, logit in zip(rows, self.logits(batch)):
                out[r] = logit
        return np.stack(out) if out else np.zeros((0, 1), dtype=np.float32)

    def predict_texts(self, tokenizer, text_a, text_b=None, max_seq_length: int = 128, batch_size: int = 64):
        enc = tokenize(tokenizer, text_a, text_b, max_seq_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return self.predict_encoded(enc["input_ids"], enc.get("token_type_ids"), pad_id, batch_size)


def pad_numpy(input_ids: list[list[int]], token_type_ids: list[list[int]] | None, pad_id: int) -> dict:
    """int64 (B, T) arrays padded to the longest row, with the attention mask (always given)."""
    length = max(len(ids) for ids in input_ids)
    ids = np.full((len(input_ids), length), pad_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for i, row in enumerate(input_ids):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        if token_type_ids is not None:
            types[i, :len(row)] = token_type_ids[i]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@dataclass
class ParityLimits:
    """What an export must keep on the dev set given to it (agreement: share of identical
    predicted classes, or for regression of predictions within 0.05 of PyTorch's)."""

    fp32_min_agreement: float = 0.999
    fp32_max_metric_drop: float = 0.001
    int8_min_agreement: float = 0.95
    int8_max_metric_drop: float = 0.01


def check_parity(model_dir: str, out_dir: str, task_name: str, data_dir: str, max_eval_samples: int = -1,
                 max_seq_length: int = 128, limits: ParityLimits = ParityLimits(), threads: int = 0) -> dict:
    """Score PyTorch and every ONNX file in ``out_dir`` on the first dev split; write
    ``out_dir/parity.json``; UserError naming the first limit missed."""
    from transformers import AutoTokenizer

    from lrcbert.data import glue, glue_metrics
    from lrcbert.inference import load_classifier_for_inference, predict_logits

    task = glue.get_task(task_name)
    split = task.dev_splits[0]
    ex = glue.load_examples(task, data_dir, split, max_eval_samples if max_eval_samples > 0 else 0)
    labels = np.asarray(ex.labels)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def preds_of(logits: np.ndarray) -> np.ndarray:
        return logits.reshape(-1) if task.is_regression else logits.argmax(-1)

    torch_logits = predict_logits(load_classifier_for_inference(model_dir), tokenizer, ex.text_a, ex.text_b,
                                  max_seq_length).numpy()
    reference = preds_of(torch_logits)
    report = {"task": task.name, "split": split, "examples": len(ex), "max_seq_length": max_seq_length,
              "pytorch": {"metrics": glue_metrics.compute_metrics(task, reference, labels)}, "limits": vars(limits)}
    metric = task.primary_metric
    failures = []
    for kind, path in (("fp32", os.path.join(out_dir, FP32_FILE)), ("int8", os.path.join(out_dir, INT8_FILE))):
        if not os.path.isfile(path):
            continue
        logits = OnnxClassifier(path, threads).predict_texts(tokenizer, ex.text_a, ex.text_b, max_seq_length)
        preds = preds_of(logits)
        agree = (np.abs(preds - reference) <= 0.05) if task.is_regression else (preds == reference)
        metrics = glue_metrics.compute_metrics(task, preds, labels)
        drop = report["pytorch"]["metrics"][metric] - metrics[metric]
        report[kind] = {"file": os.path.basename(path), "metrics": metrics, "agreement": float(agree.mean()),
                        "metric_drop": float(drop), "max_abs_logit_diff": float(np.abs(logits - torch_logits).max())}
        min_agree, max_drop = getattr(limits, f"{kind}_min_agreement"), getattr(limits, f"{kind}_max_metric_drop")
        if agree.mean() < min_agree:
            failures.append(f"{kind} agrees with PyTorch on {agree.mean():.4f} of {split} predictions, below "
                            f"{min_agree}")
        if drop > max_drop:
            failures.append(f"{kind} {metric} {metrics[metric]:.4f} is {drop:.4f} below PyTorch's, "
                            f"more than {max_drop}")
    report["passed"] = not failures
    write_json_atomic(os.path.join(out_dir, PARITY_FILE), report, indent=2)
    if failures:
        raise ParityError(f"parity check failed ({os.path.join(out_dir, PARITY_FILE)}): " + "; ".join(failures))
    return report


class ParityError(UserError):
    """An export that does not reproduce the PyTorch model within the limits."""


def describe(report: dict) -> str:
    metric_rows = [f"pytorch: {json.dumps(report['pytorch']['metrics'])}"]
    for kind in ("fp32", "int8"):
        if kind in report:
            r = report[kind]
            metric_rows.append(f"onnx {kind}: {json.dumps(r['metrics'])}, agreement {r['agreement']:.4f}, "
                               f"metric drop {r['metric_drop']:+.4f}, max |logit diff| {r['max_abs_logit_diff']:.2e}")
    return f"parity on {report['task']} {report['split']} ({report['examples']} examples):\n  " + "\n  ".join(
        metric_rows)
