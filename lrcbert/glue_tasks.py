"""The GLUE task table, readers for the original TSV files and the hub, metrics, leaderboard files.

Task differences are data: one frozen :class:`TaskSpec` per task in ``TASKS``; the readers,
metrics and submission writer look everything up there (no per-task branches).

Split names are the GLUE file stems: ``train``, ``dev``, ``test``; MNLI has ``dev_matched``,
``dev_mismatched``, ``test_matched``, ``test_mismatched`` and ``diagnostic`` (the AX set,
scored with MNLI's model). Class ids follow the Hugging Face ``glue`` dataset's ClassLabel
order, so a model trained on TSV data and one trained on hub data agree on every id.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lrcbert.errors import UserError

SMALL_DATASET_MAX_TRAIN = 10_000  # METHOD: "90 epochs for datasets under 10k examples"
SMALL_DATASET_EPOCHS = 90
LARGE_DATASET_EPOCHS = 18

INDEX_COLUMNS = ("index", "id")  # test files name their index column one of these (QQP: id)
HUB_DATASETS = ("nyu-mll/glue", "glue")  # current hub name first, the legacy script name second
HUB_INDEX_COLUMN = "idx"
# File names tried for a split, in order; any other split is "<split>.tsv". GLUE's download
# script puts AX at glue_data/diagnostic/diagnostic.tsv, beside the MNLI folder.
_SPLIT_FILES = {"diagnostic": ("diagnostic.tsv", "AX.tsv", "../diagnostic/diagnostic.tsv")}
_HUB_SPLITS = {"diagnostic": ("ax", "test")}  # split -> (hub subset, hub split) overrides


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task. ``label_strings is None`` marks regression (STS-B)."""

    name: str  # canonical lower-case name, as in the hub subset: "sst2"
    glue_name: str  # GLUE folder / leaderboard spelling: "SST-2"
    text_columns: tuple[str, ...]  # TSV header names of the one or two texts
    label_column: str  # TSV header name of the gold label
    label_strings: tuple[str, ...] | None  # TSV label values in class-id order; None: float score
    label_names: tuple[str, ...] | None  # readable class names in class-id order (id2label)
    metrics: tuple[str, ...]  # official metric names; the first is the primary one
    dev_splits: tuple[str, ...]
    test_splits: tuple[tuple[str, str], ...]  # (split, leaderboard submission file name)
    hub_subset: str  # datasets.load_dataset("nyu-mll/glue", hub_subset)
    hub_text_columns: tuple[str, ...]
    train_size: int  # examples in GLUE's train split: picks the default epoch count
    headerless_columns: tuple[str, ...] | None = None  # names for labelled files with no header

    @property
    def is_regression(self) -> bool:
        return self.label_strings is None

    @property
    def num_labels(self) -> int:
        """Model output width: classes, or 1 for regression."""
        return 1 if self.label_strings is None else len(self.label_strings)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @property
    def small_dataset(self) -> bool:
        return self.train_size < SMALL_DATASET_MAX_TRAIN

    @property
    def default_epochs(self) -> int:
        """90 for train sets under 10k examples, else 18 (METHOD). METHOD names MRPC, RTE and
        CoLA; STS-B (5,749) and WNLI (635) are under 10k as well, so they get 90 too."""
        return SMALL_DATASET_EPOCHS if self.small_dataset else LARGE_DATASET_EPOCHS

    @property
    def test_split_names(self) -> tuple[str, ...]:
        return tuple(split for split, _ in self.test_splits)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) + self.dev_splits + self.test_split_names

    def submission_file(self, split: str) -> str:
        for test_split, file_name in self.test_splits:
            if test_split == split:
                return file_name
        raise UserError(
            f"{self.glue_name} has no test split {split!r}; test splits: "
            f"{', '.join(self.test_split_names)}"
        )


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")
_MNLI = ("entailment", "neutral", "contradiction")
_PAIR = ("sentence1", "sentence2")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", "CoLA", ("sentence",), "label", _BINARY, ("unacceptable", "acceptable"),
                 ("matthews_correlation",), ("dev",), (("test", "CoLA.tsv"),),
                 "cola", ("sentence",), 8_551,
                 headerless_columns=("source", "label", "original_label", "sentence")),
        TaskSpec("sst2", "SST-2", ("sentence",), "label", _BINARY, ("negative", "positive"),
                 ("accuracy",), ("dev",), (("test", "SST-2.tsv"),),
                 "sst2", ("sentence",), 67_349),
        TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", _BINARY,
                 ("not_equivalent", "equivalent"), ("f1", "accuracy"), ("dev",),
                 (("test", "MRPC.tsv"),), "mrpc", _PAIR, 3_668),
        TaskSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", _BINARY,
                 ("not_duplicate", "duplicate"), ("f1", "accuracy"), ("dev",),
                 (("test", "QQP.tsv"),), "qqp", ("question1", "question2"), 363_846),
        TaskSpec("stsb", "STS-B", _PAIR, "score", None, None, ("pearson", "spearmanr"), ("dev",),
                 (("test", "STS-B.tsv"),), "stsb", _PAIR, 5_749),
        TaskSpec("mnli", "MNLI", _PAIR, "gold_label", _MNLI, _MNLI, ("accuracy",),
                 ("dev_matched", "dev_mismatched"),
                 (("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv"),
                  ("diagnostic", "AX.tsv")),
                 "mnli", ("premise", "hypothesis"), 392_702),
        TaskSpec("qnli", "QNLI", ("question", "sentence"), "label", _NLI, _NLI, ("accuracy",),
                 ("dev",), (("test", "QNLI.tsv"),), "qnli", ("question", "sentence"), 104_743),
        TaskSpec("rte", "RTE", _PAIR, "label", _NLI, _NLI, ("accuracy",), ("dev",),
                 (("test", "RTE.tsv"),), "rte", _PAIR, 2_490),
        # WNLI's TSV labels are 0/1 with 1 = entailment, hence the reversed class names
        TaskSpec("wnli", "WNLI", _PAIR, "label", _BINARY, ("not_entailment", "entailment"),
                 ("accuracy",), ("dev",), (("test", "WNLI.tsv"),), "wnli", _PAIR, 635),
    )
}


def _normalize(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.strip().lower())


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The task called ``name``: case-insensitive, GLUE spellings accepted ("SST-2", "STS-B")."""
    if isinstance(name, TaskSpec):
        return name
    task = TASKS.get(_normalize(str(name)))
    if task is None:
        raise UserError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
    return task


# ----------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """Parallel lists of one split. ``labels``: class ids, floats (STS-B) or None (test).
    ``index``: the file's index/id column, or the 0-based row number where there is none."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float] | None
    index: list[int]

    def __post_init__(self) -> None:
        n = len(self.text_a)
        for field in (self.text_b, self.labels, self.index):
            if field is not None and len(field) != n:
                raise ValueError(f"Examples lists differ in length: {len(field)} != {n}")

    def __len__(self) -> int:
        return len(self.text_a)


def _check_split(task: TaskSpec, split: str) -> None:
    if split not in task.splits:
        raise UserError(
            f"{task.glue_name} has no split {split!r}; valid splits: {', '.join(task.splits)}"
        )


def _task_dir(task: TaskSpec, data_dir: str | Path) -> Path:
    """``data_dir`` may be the task folder (GLUE/SST-2) or the GLUE root holding it."""
    data_dir = Path(data_dir)
    nested = data_dir / task.glue_name
    return nested if nested.is_dir() else data_dir


def _split_candidates(task: TaskSpec, data_dir: str | Path, split: str) -> list[Path]:
    task_dir = _task_dir(task, data_dir)
    return [task_dir / name for name in _SPLIT_FILES.get(split, (f"{split}.tsv",))]


def split_path(task: TaskSpec | str, data_dir: str | Path, split: str) -> Path:
    """The file holding ``split``; UserError naming the expected path if there is none."""
    task = get_task(task)
    _check_split(task, split)
    candidates = _split_candidates(task, data_dir, split)
    for path in candidates:
        if path.is_file():
            return path
    tried = " or ".join(str(p) for p in candidates)
    raise UserError(f"{task.glue_name} {split} file not found: {tried}")


def available_splits(task: TaskSpec | str, data_dir: str | Path) -> list[str]:
    """The splits of ``task`` whose files exist under ``data_dir``, in task order."""
    task = get_task(task)
    return [
        split for split in task.splits
        if any(p.is_file() for p in _split_candidates(task, data_dir, split))
    ]


def _parse_label(task: TaskSpec, value: str, where: str) -> int | float:
    if task.label_strings is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise UserError(f"{where}: label {value!r} is not a finite number")
        return score
    try:
        return task.label_strings.index(value)
    except ValueError:
        raise UserError(
            f"{where}: label {value!r} is not one of {', '.join(task.label_strings)}"
        ) from None


def read_split(task: TaskSpec | str, data_dir: str | Path, split: str) -> Examples:
    """Read one split of the original GLUE TSV files.

    Lines are split on tabs with no quote handling (STS-B and MNLI hold stray ``"``, GLUE
    reads them with quoting off); a UTF-8 BOM (MRPC) is dropped; blank lines are skipped.
    Test and diagnostic splits carry no labels. Every problem raises a one-line UserError
    naming ``file:line``.
    """
    task = get_task(task)
    path = split_path(task, data_dir, split)
    labelled = split not in task.test_split_names
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    rows = [(n, line.rstrip("\r")) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise UserError(f"{path}:1: file is empty, expected a {task.glue_name} {split} split")

    first = rows[0][1].split("\t")
    if all(c in first for c in task.text_columns):
        header, rows = first, rows[1:]
    elif labelled and task.headerless_columns is not None:
        header = list(task.headerless_columns)  # CoLA train/dev: no header row
    else:
        raise UserError(
            f"{path}:{rows[0][0]}: header lacks text column(s) "
            f"{', '.join(c for c in task.text_columns if c not in first)}; found {first}"
        )
    if labelled and task.label_column not in header:
        raise UserError(f"{path}:1: no label column {task.label_column!r} in header {header}")
    if not rows:
        raise UserError(f"{path}:{len(lines)}: no examples after the header")

    text_cols = [header.index(c) for c in task.text_columns]
    label_col = header.index(task.label_column) if labelled else None
    index_col = next((header.index(c) for c in INDEX_COLUMNS if c in header), None)
    texts: list[list[str]] = [[] for _ in text_cols]
    labels: list = []
    index: list[int] = []
    for row_number, (line_number, line) in enumerate(rows):
        where = f"{path}:{line_number}"
        fields = line.split("\t")
        if len(fields) != len(header):
            raise UserError(
                f"{where}: expected {len(header)} tab-separated columns, found {len(fields)}"
            )
        for column, out in zip(text_cols, texts):
            out.append(fields[column])
        if label_col is not None:
            labels.append(_parse_label(task, fields[label_col], where))
        if index_col is None:
            index.append(row_number)
        else:
            try:
                index.append(int(fields[index_col]))
            except ValueError:
                raise UserError(
                    f"{where}: index {fields[index_col]!r} is not an integer"
                ) from None
    return Examples(
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=labels if labelled else None,
        index=index,
    )


def load_hub_split(task: TaskSpec | str, split: str, cache_dir: str | None = None) -> Examples:
    """Load ``split`` from the Hugging Face hub (needs internet); same result as read_split.

    Hub split names: dev* -> validation*, MNLI's diagnostic -> subset "ax", split "test".
    Hub test labels are -1, returned as ``labels=None``.
    """
    import datasets  # deferred: only hub users pay for the import

    task = get_task(task)
    _check_split(task, split)
    subset, hub_split = _HUB_SPLITS.get(
        split, (task.hub_subset, re.sub(r"^dev", "validation", split))
    )
    failures = []
    for hub_name in HUB_DATASETS:
        try:
            data = datasets.load_dataset(hub_name, subset, split=hub_split, cache_dir=cache_dir)
            break
        except Exception as e:  # offline, renamed dataset, no script support: try the next name
            first_line = (str(e).splitlines() or [""])[0]
            failures.append(f"{hub_name}: {type(e).__name__}: {first_line}")
    else:
        raise UserError(
            f"cannot load {task.glue_name} {split} from the Hugging Face hub "
            f"({'; '.join(failures)}); without internet pass --data_dir with the GLUE TSV files"
        )
    if len(data) == 0:
        raise UserError(f"hub glue/{subset} split {hub_split} has no examples")
    texts = [list(data[c]) for c in task.hub_text_columns]
    labels = None
    if split not in task.test_split_names:
        cast = float if task.is_regression else int
        labels = [cast(v) for v in data["label"]]
    index = data[HUB_INDEX_COLUMN] if HUB_INDEX_COLUMN in data.column_names else range(len(data))
    return Examples(
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=labels,
        index=[int(i) for i in index],
    )


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
        predictions.append(_parse_label(task, fields[1], f"{path}:{line_number}"))
    return indices, predictions
