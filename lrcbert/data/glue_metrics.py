"""GLUE scoring: the official metrics, the chance score, and leaderboard submission files.

Each task's metric names come from its :class:`~lrcbert.data.glue.TaskSpec`; the functions
here compute them (degenerate inputs score 0.0, never NaN) and write or read the files the
GLUE server takes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from lrcbert.data.glue import TaskSpec, get_task, parse_label
from lrcbert.errors import UserError

# ----------------------------------------------------------------------------- metrics


def _as_class_ids(task: TaskSpec, values: Sequence, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D class ids, got shape {array.shape}")
    ids = array.astype(np.int64)
    if np.any(ids != array) or np.any(ids < 0) or np.any(ids >= task.num_labels):
        raise ValueError(f"{what} must be class ids in [0, {task.num_labels})")
    return ids


def _is_constant(x: np.ndarray) -> bool:
    return len(x) < 2 or bool(np.all(x == x[0]))


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, pred))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    # F1 of the positive class (1 = equivalent / duplicate), as GLUE reports it
    return float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0.0))


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    if _is_constant(np.concatenate([pred, gold])):
        return 0.0  # one class everywhere: sklearn warns and returns 0
    return float(matthews_corrcoef(gold, pred))


def _pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import pearsonr

    if _is_constant(pred) or _is_constant(gold):
        return 0.0  # undefined (scipy warns, returns NaN); a constant predictor scores 0
    return float(pearsonr(pred, gold)[0])


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if _is_constant(pred) or _is_constant(gold):
        return 0.0
    return float(spearmanr(pred, gold)[0])


METRIC_FUNCTIONS = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def compute_metrics(
    task: TaskSpec | str, predictions: Sequence, labels: Sequence
) -> dict[str, float]:
    """The task's official metrics, primary first. ``predictions``: class ids (or floats for
    STS-B), one per label. Degenerate inputs (constant predictions) score 0.0, never NaN."""
    task = get_task(task)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("no labels to score")
    if task.is_regression:
        pred = np.asarray(predictions, dtype=np.float64).reshape(-1)
        gold = np.asarray(labels, dtype=np.float64).reshape(-1)
    else:
        pred = _as_class_ids(task, predictions, "predictions")
        gold = _as_class_ids(task, labels, "labels")
    return {name: METRIC_FUNCTIONS[name](pred, gold) for name in task.metrics}


def chance_score(task: TaskSpec | str, labels: Sequence) -> float:
    """The primary metric of the best constant prediction on ``labels``: majority-class
    accuracy; F1 of always predicting the positive class; 0.0 for MCC and correlations.
    A teacher scoring no better than this has learned nothing."""
    task = get_task(task)
    n = len(labels)
    if n == 0:
        raise ValueError("no labels to score")
    if task.is_regression:
        constants = [float(np.mean(np.asarray(labels, dtype=np.float64)))]
    else:
        constants = range(task.num_labels)
    return max(compute_metrics(task, [c] * n, labels)[task.primary_metric] for c in constants)


# ----------------------------------------------------------------------------- submissions


def format_prediction(task: TaskSpec, prediction: int | float) -> str:
    """One prediction as the GLUE server reads it: the TSV label string (0/1 or
    entailment/...), or for STS-B a score clipped to [0, 5] with 3 decimals."""
    if task.label_strings is None:
        score = float(prediction)
        if not math.isfinite(score):
            raise ValueError(f"STS-B prediction {prediction!r} is not finite")
        return f"{min(max(score, 0.0), 5.0):.3f}"
    class_id = int(prediction)
    if class_id != prediction or not 0 <= class_id < task.num_labels:
        raise ValueError(f"prediction {prediction!r} is not a class id of {task.glue_name}")
    return task.label_strings[class_id]


def write_submission(
    task: TaskSpec | str,
    split: str,
    indices: Sequence[int],
    predictions: Sequence,
    out_dir: str | Path,
) -> Path:
    """Write the leaderboard file for a test split (e.g. MNLI-m.tsv) into ``out_dir``:
    header ``index<TAB>prediction``, one row per example. Call on rank 0 only."""
    task = get_task(task)
    file_name = task.submission_file(split)
    if len(indices) != len(predictions):
        raise ValueError(f"{len(indices)} indices for {len(predictions)} predictions")
    rows = [f"{int(i)}\t{format_prediction(task, p)}\n" for i, p in zip(indices, predictions)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name
    path.write_text("index\tprediction\n" + "".join(rows), encoding="utf-8")
    return path


def read_submission(task: TaskSpec | str, path: str | Path) -> tuple[list[int], list]:
    """Read a leaderboard file back: (indices, class ids or floats)."""
    task = get_task(task)
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "index\tprediction":
        raise UserError(f"{path}:1: expected header 'index<TAB>prediction'")
    indices, predictions = [], []
    for line_number, line in enumerate(lines[1:], 2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise UserError(f"{path}:{line_number}: expected 2 columns, found {len(fields)}")
        indices.append(int(fields[0]))
        predictions.append(parse_label(task, fields[1], f"{path}:{line_number}"))
    return indices, predictions
