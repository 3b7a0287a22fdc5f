"""The GLUE task table and the readers of its data: the original TSV files and the hub.

Task differences are data: one frozen :class:`TaskSpec` per task in ``TASKS``; the readers
(and the metrics and submission files of ``glue_metrics.py``) look everything up there, with
no per-task branches.

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
        TaskSpec(
            name="cola", glue_name="CoLA", hub_subset="cola", train_size=8_551,
            text_columns=("sentence",), hub_text_columns=("sentence",),
            label_column="label", label_strings=_BINARY, label_names=("unacceptable", "acceptable"),
            metrics=("matthews_correlation",),
            dev_splits=("dev",), test_splits=(("test", "CoLA.tsv"),),
            headerless_columns=("source", "label", "original_label", "sentence"),
        ),
        TaskSpec(
            name="sst2", glue_name="SST-2", hub_subset="sst2", train_size=67_349,
            text_columns=("sentence",), hub_text_columns=("sentence",),
            label_column="label", label_strings=_BINARY, label_names=("negative", "positive"),
            metrics=("accuracy",),
            dev_splits=("dev",), test_splits=(("test", "SST-2.tsv"),),
        ),
        TaskSpec(
            name="mrpc", glue_name="MRPC", hub_subset="mrpc", train_size=3_668,
            text_columns=("#1 String", "#2 String"), hub_text_columns=_PAIR,
            label_column="Quality", label_strings=_BINARY, label_names=("not_equivalent", "equivalent"),
            metrics=("f1", "accuracy"),
            dev_splits=("dev",), test_splits=(("test", "MRPC.tsv"),),
        ),
        TaskSpec(
            name="qqp", glue_name="QQP", hub_subset="qqp", train_size=363_846,
            text_columns=("question1", "question2"), hub_text_columns=("question1", "question2"),
            label_column="is_duplicate", label_strings=_BINARY, label_names=("not_duplicate", "duplicate"),
            metrics=("f1", "accuracy"),
            dev_splits=("dev",), test_splits=(("test", "QQP.tsv"),),
        ),
        TaskSpec(
            name="stsb", glue_name="STS-B", hub_subset="stsb", train_size=5_749,
            text_columns=_PAIR, hub_text_columns=_PAIR,
            label_column="score", label_strings=None, label_names=None,
            metrics=("pearson", "spearmanr"),
            dev_splits=("dev",), test_splits=(("test", "STS-B.tsv"),),
        ),
        TaskSpec(
            name="mnli", glue_name="MNLI", hub_subset="mnli", train_size=392_702,
            text_columns=_PAIR, hub_text_columns=("premise", "hypothesis"),
            label_column="gold_label", label_strings=_MNLI, label_names=_MNLI,
            metrics=("accuracy",),
            dev_splits=("dev_matched", "dev_mismatched"),
            test_splits=(("test_matched", "MNLI-m.tsv"), ("test_mismatched", "MNLI-mm.tsv"),
                         ("diagnostic", "AX.tsv")),
        ),
        TaskSpec(
            name="qnli", glue_name="QNLI", hub_subset="qnli", train_size=104_743,
            text_columns=("question", "sentence"), hub_text_columns=("question", "sentence"),
            label_column="label", label_strings=_NLI, label_names=_NLI,
            metrics=("accuracy",),
            dev_splits=("dev",), test_splits=(("test", "QNLI.tsv"),),
        ),
        TaskSpec(
            name="rte", glue_name="RTE", hub_subset="rte", train_size=2_490,
            text_columns=_PAIR, hub_text_columns=_PAIR,
            label_column="label", label_strings=_NLI, label_names=_NLI,
            metrics=("accuracy",),
            dev_splits=("dev",), test_splits=(("test", "RTE.tsv"),),
        ),
        TaskSpec(
            name="wnli", glue_name="WNLI", hub_subset="wnli", train_size=635,
            text_columns=_PAIR, hub_text_columns=_PAIR,
            # WNLI's TSV labels are 0/1 with 1 = entailment, hence the reversed class names
            label_column="label", label_strings=_BINARY, label_names=("not_entailment", "entailment"),
            metrics=("accuracy",),
            dev_splits=("dev",), test_splits=(("test", "WNLI.tsv"),),
        ),
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

    def head(self, limit: int) -> Examples:
        """The first ``limit`` examples (all of them when ``limit`` is not below the length)."""
        if limit >= len(self):
            return self
        return Examples(
            text_a=self.text_a[:limit],
            text_b=self.text_b[:limit] if self.text_b is not None else None,
            labels=self.labels[:limit] if self.labels is not None else None,
            index=self.index[:limit],
        )


def load_examples(task: TaskSpec | str, data_dir: str | Path | None, split: str, limit: int = 0) -> Examples:
    """One split of ``task``: from the TSV files under ``data_dir``, or from the hub when
    ``data_dir`` is None or empty. ``limit > 0`` keeps the first ``limit`` rows."""
    ex = read_split(task, data_dir, split) if data_dir else load_hub_split(task, split)
    return ex.head(limit) if limit > 0 else ex


# ----------------------------------------------------------------------------- TSV files


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


def parse_label(task: TaskSpec, value: str, where: str) -> int | float:
    """A TSV label string as a class id (or a finite float for STS-B); UserError naming ``where``."""
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
            labels.append(parse_label(task, fields[label_col], where))
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


# ----------------------------------------------------------------------------- the hub


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
