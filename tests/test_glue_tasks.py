"""Fast tests of the GLUE task table, TSV readers, metrics and leaderboard files (no network)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lrcbert.data import glue as gt
from lrcbert.data import glue_metrics as gm
from lrcbert.errors import UserError

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "GLUE"
needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"real GLUE data not found at {GLUE_DIR} (beside the checkout)"
)

# ----------------------------------------------------------------------------- task table


@pytest.mark.parametrize(
    "alias, name",
    [("CoLA", "cola"), ("SST-2", "sst2"), ("sst_2", "sst2"), ("MRPC", "mrpc"), ("QQP", "qqp"),
     ("STS-B", "stsb"), ("sts-b", "stsb"), ("MNLI", "mnli"), ("QNLI", "qnli"), ("RTE", "rte"),
     ("WNLI", "wnli"), ("  rte ", "rte")],
)
def test_get_task_accepts_glue_spellings(alias, name):
    assert gt.get_task(alias) is gt.TASKS[name]
    assert gt.get_task(gt.TASKS[name]) is gt.TASKS[name]


def test_unknown_task_names_it_and_lists_valid_ones():
    with pytest.raises(UserError) as info:
        gt.get_task("mnli-xx")
    message = str(info.value)
    assert "'mnli-xx'" in message
    for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"):
        assert name in message
    assert "\n" not in message


def test_table_matches_hub_label_order_and_leaderboard_files():
    expected_names = {
        "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
        "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
        "stsb": None, "mnli": ("entailment", "neutral", "contradiction"),
        "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
        "wnli": ("not_entailment", "entailment"),
    }
    assert {name: t.label_names for name, t in gt.TASKS.items()} == expected_names
    for task in gt.TASKS.values():
        assert task.hub_subset == task.name
        assert len(task.text_columns) == len(task.hub_text_columns) in (1, 2)
        if task.label_names is not None:
            assert task.num_labels == len(task.label_names) == len(task.label_strings)
    assert [t.name for t in gt.TASKS.values() if t.is_regression] == ["stsb"]
    assert gt.TASKS["stsb"].num_labels == 1
    files = [f for t in gt.TASKS.values() for _, f in t.test_splits]
    assert sorted(files) == sorted(
        ["CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv",
         "MNLI-mm.tsv", "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"]
    )
    assert gt.TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    assert gt.TASKS["mnli"].submission_file("diagnostic") == "AX.tsv"
    primary = {t.name: t.primary_metric for t in gt.TASKS.values()}
    assert primary == {"cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1",
                       "qqp": "f1", "stsb": "pearson", "mnli": "accuracy", "qnli": "accuracy",
                       "rte": "accuracy", "wnli": "accuracy"}
    epochs = {t.name: t.default_epochs for t in gt.TASKS.values()}
    assert epochs == {"cola": 90, "sst2": 18, "mrpc": 90, "qqp": 18, "stsb": 90, "mnli": 18,
                      "qnli": 18, "rte": 90, "wnli": 90}


# ----------------------------------------------------------------------------- real files

REAL_COUNTS = [
    ("SST-2", "train", 67_349), ("SST-2", "dev", 872), ("SST-2", "test", 1_821),
    ("CoLA", "train", 8_551), ("CoLA", "dev", 1_043), ("CoLA", "test", 1_063),
    ("STS-B", "train", 5_749), ("STS-B", "dev", 1_500), ("STS-B", "test", 1_379),
    ("QNLI", "dev", 5_463), ("QNLI", "test", 5_463),
    ("MRPC", "train", 3_668), ("MRPC", "dev", 408), ("MRPC", "test", 1_725),
    ("RTE", "train", 2_490), ("RTE", "dev", 277), ("RTE", "test", 3_000),
]


@needs_glue
@pytest.mark.parametrize("glue_name, split, count", REAL_COUNTS)
def test_reads_every_real_file(glue_name, split, count):
    task = gt.get_task(glue_name)
    examples = gt.read_split(task, GLUE_DIR / glue_name, split)
    assert len(examples) == count
    assert (examples.text_b is None) == (len(task.text_columns) == 1)
    assert all(isinstance(t, str) and t for t in examples.text_a)
    if split == "test":
        assert examples.labels is None
        assert examples.index == list(range(count))  # the files' own index column
    elif task.is_regression:
        assert all(0.0 <= y <= 5.0 for y in examples.labels)
    else:
        assert set(examples.labels) == set(range(task.num_labels))


@needs_glue
def test_real_file_quirks():
    # CoLA dev: no header, no trailing newline
    cola = gt.read_split(gt.TASKS["cola"], GLUE_DIR, "dev")  # GLUE root works as data_dir too
    assert cola.text_a[0] == "The sailors rode the breeze clear of the rocks."
    assert cola.text_a[-1] == "John talked to Bill about himself."
    assert cola.labels[-1] == 1
    # MRPC: the BOM does not hide the "Quality" column
    mrpc = gt.read_split(gt.TASKS["mrpc"], GLUE_DIR / "MRPC", "dev")
    assert mrpc.labels[:2] == [1, 0]
    assert mrpc.text_b[0].startswith('"The foodservice pie')  # quotes kept verbatim
    # STS-B dev: stray quotes do not merge lines
    stsb = gt.read_split(gt.TASKS["stsb"], GLUE_DIR / "STS-B", "dev")
    assert sum('"' in a + b for a, b in zip(stsb.text_a, stsb.text_b)) > 0
    assert stsb.labels[:2] == [5.0, 4.75]
    qnli = gt.read_split(gt.TASKS["qnli"], GLUE_DIR / "QNLI", "dev")
    assert qnli.labels[:2] == [0, 1]  # entailment, not_entailment


@needs_glue
def test_available_splits_on_real_data():
    assert gt.available_splits(gt.TASKS["qnli"], GLUE_DIR / "QNLI") == ["dev", "test"]
    assert gt.available_splits(gt.TASKS["sst2"], GLUE_DIR) == ["train", "dev", "test"]
    assert gt.available_splits(gt.TASKS["mnli"], GLUE_DIR) == []


# ----------------------------------------------------------------------------- fixtures

MNLI_BASE = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
             "sentence1_parse sentence2_parse sentence1 sentence2").split()


def _write(path: Path, rows, newline_at_end=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(map(str, r)) for r in rows)
    path.write_text(text + ("\n" if newline_at_end else ""), encoding="utf-8")
    return path


def _mnli_row(i, s1, s2, *labels):
    return [i, 100 + i, f"{100 + i}e", "fiction", "( p )", "( h )", "(ROOT p)", "(ROOT h)",
            s1, s2, *labels]


@pytest.fixture
def mnli_dir(tmp_path):
    d = tmp_path / "MNLI"
    _write(d / "train.tsv", [MNLI_BASE + ["label1", "gold_label"],
                             _mnli_row(0, "A man sleeps.", "A person rests.", "entailment",
                                       "entailment"),
                             _mnli_row(1, 'He said "no.', "He agreed.", "contradiction",
                                       "contradiction")])
    dev_header = MNLI_BASE + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    for split, gold in (("dev_matched", "neutral"), ("dev_mismatched", "contradiction")):
        _write(d / f"{split}.tsv", [dev_header, _mnli_row(7, "P.", "H.", *[gold] * 5, gold)])
    for split in ("test_matched", "test_mismatched"):
        _write(d / f"{split}.tsv", [MNLI_BASE, _mnli_row(0, "P0.", "H0."),
                                    _mnli_row(1, "P1.", "H1.")])
    _write(d / "AX.tsv", [["index", "sentence1", "sentence2"], [0, "The cat sat.", "A cat sat."]])
    return d


def test_mnli_fixture_all_splits(mnli_dir):
    task = gt.get_task("MNLI")
    assert gt.available_splits(task, mnli_dir) == list(task.splits)
    train = gt.read_split(task, mnli_dir, "train")
    assert train.labels == [0, 2]
    assert train.text_a[1] == 'He said "no.'
    assert train.text_b == ["A person rests.", "He agreed."]
    assert gt.read_split(task, mnli_dir, "dev_matched").labels == [1]
    assert gt.read_split(task, mnli_dir, "dev_mismatched").index == [7]
    test = gt.read_split(task, mnli_dir.parent, "test_mismatched")  # root as data_dir
    assert test.labels is None and test.index == [0, 1] and test.text_a == ["P0.", "P1."]
    ax = gt.read_split(task, mnli_dir, "diagnostic")
    assert ax.labels is None and ax.text_b == ["A cat sat."]


def test_diagnostic_in_glue_download_layout(tmp_path):
    _write(tmp_path / "diagnostic" / "diagnostic.tsv", [["index", "sentence1", "sentence2"],
                                                        [0, "a", "b"], [1, "c", "d"]])
    (tmp_path / "MNLI").mkdir()
    assert len(gt.read_split(gt.TASKS["mnli"], tmp_path, "diagnostic")) == 2


def test_qqp_fixture(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(tmp_path / "train.tsv", [header, [201, 1, 2, "How?", "How so?", 1],
                                    [202, 3, 4, "Why?", "When?", 0]], newline_at_end=False)
    _write(tmp_path / "test.tsv", [["id", "question1", "question2"], [0, "a?", "b?"],
                                   [1, "c?", "d?"]])
    task = gt.get_task("qqp")
    train = gt.read_split(task, tmp_path, "train")
    assert train.labels == [1, 0] and train.index == [201, 202]
    assert train.text_a == ["How?", "Why?"] and train.text_b == ["How so?", "When?"]
    test = gt.read_split(task, tmp_path, "test")
    assert test.labels is None and test.index == [0, 1]
    assert gt.available_splits(task, tmp_path) == ["train", "test"]


def test_wnli_fixture_label_order(tmp_path):
    _write(tmp_path / "dev.tsv", [["index", "sentence1", "sentence2", "label"],
                                  [0, "s1", "s2", 1], [1, "s3", "s4", 0]])
    task = gt.get_task("WNLI")
    dev = gt.read_split(task, tmp_path, "dev")
    assert dev.labels == [1, 0]
    assert [task.label_names[y] for y in dev.labels] == ["entailment", "not_entailment"]


# ----------------------------------------------------------------------------- bad input

RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


def _raises(task, data_dir, split, *fragments):
    with pytest.raises(UserError) as info:
        gt.read_split(gt.get_task(task), data_dir, split)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message


def test_wrong_column_count_names_file_line_and_counts(tmp_path):
    path = _write(tmp_path / "dev.tsv", [RTE_HEADER, [0, "a", "b", "entailment"],
                                         [1, "a\tb", "c", "entailment"]])
    _raises("rte", tmp_path, "dev", f"{path}:3", "expected 4", "found 5")


def test_bad_label_names_file_line_and_value(tmp_path):
    path = _write(tmp_path / "dev.tsv", [RTE_HEADER, [0, "a", "b", "entailment"],
                                         [1, "a", "b", "neutral"]])
    _raises("rte", tmp_path, "dev", f"{path}:3", "'neutral'")
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2",
              "sentence1", "sentence2", "score"]
    path = _write(tmp_path / "STS-B" / "train.tsv",
                  [header, [0, "g", "f", "y", "0", "n", "n", "a", "b", "4.0"],
                   [1, "g", "f", "y", "1", "n", "n", "a", "b", "high"]])
    _raises("stsb", tmp_path, "train", f"{path}:3", "'high'")
    _write(tmp_path / "CoLA" / "train.tsv", [["gj04", 1, "", "Fine."], ["gj04", 2, "*", "Bad."]])
    _raises("cola", tmp_path, "train", "CoLA/train.tsv:2", "'2'")


def test_missing_empty_and_header_only_files(tmp_path):
    _raises("sst2", tmp_path, "dev", str(tmp_path / "dev.tsv"), "not found")
    (tmp_path / "dev.tsv").write_text("")
    _raises("sst2", tmp_path, "dev", f"{tmp_path / 'dev.tsv'}:1", "empty")
    _write(tmp_path / "dev.tsv", [["sentence", "label"]])
    _raises("sst2", tmp_path, "dev", f"{tmp_path / 'dev.tsv'}:", "no examples")
    _write(tmp_path / "dev.tsv", [["text", "label"], ["good .", 1]])
    _raises("sst2", tmp_path, "dev", f"{tmp_path / 'dev.tsv'}:1", "sentence")
    _write(tmp_path / "train.tsv", [["index", "sentence1", "sentence2"], [0, "a", "b"]])
    _raises("rte", tmp_path, "train", "train.tsv:1", "'label'")
    _raises("rte", tmp_path, "dev_matched", "dev_matched", "valid splits: train, dev, test")


# ----------------------------------------------------------------------------- metrics


def test_metrics_hand_computed():
    labels, preds = [1, 1, 1, 0], [1, 1, 0, 0]
    assert gm.compute_metrics(gt.TASKS["sst2"], preds, labels) == {"accuracy": 0.75}
    mrpc = gm.compute_metrics(gt.TASKS["mrpc"], preds, labels)
    assert list(mrpc) == ["f1", "accuracy"]  # primary first
    assert mrpc["f1"] == pytest.approx(0.8) and mrpc["accuracy"] == 0.75
    mcc = gm.compute_metrics(gt.TASKS["cola"], preds, labels)["matthews_correlation"]
    assert mcc == pytest.approx(2 / np.sqrt(12))
    stsb = gm.compute_metrics(gt.TASKS["stsb"], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert stsb["pearson"] == pytest.approx(0.5) and stsb["spearmanr"] == pytest.approx(0.5)
    stsb = gm.compute_metrics(gt.TASKS["stsb"], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0])
    assert stsb["spearmanr"] == pytest.approx(-0.5)


@needs_glue
@pytest.mark.parametrize("glue_name", ["CoLA", "SST-2", "MRPC", "QNLI", "RTE", "STS-B"])
def test_metrics_match_sklearn_scipy_on_real_dev(glue_name):
    task = gt.get_task(glue_name)
    gold = np.asarray(gt.read_split(task, GLUE_DIR / glue_name, "dev").labels)
    rng = np.random.default_rng(1234)
    if task.is_regression:
        pred = gold + rng.normal(0.0, 1.5, size=gold.shape)
        expected = {"pearson": pearsonr(pred, gold)[0], "spearmanr": spearmanr(pred, gold)[0]}
    else:
        # a noisy predictor: right 70% of the time, else a random class
        pred = np.where(rng.random(gold.shape) < 0.7, gold,
                        rng.integers(0, task.num_labels, gold.shape))
        expected = {"accuracy": accuracy_score(gold, pred), "f1": f1_score(gold, pred),
                    "matthews_correlation": matthews_corrcoef(gold, pred)}
    got = gm.compute_metrics(task, pred.tolist(), gold.tolist())
    assert list(got) == list(task.metrics)
    for name, value in got.items():
        assert isinstance(value, float)
        assert value == pytest.approx(expected[name], abs=1e-12)
    assert got[task.primary_metric] > 0.1


def test_degenerate_inputs_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stsb = gm.compute_metrics(gt.TASKS["stsb"], [2.5, 2.5, 2.5], [1.0, 2.0, 4.0])
        assert stsb == {"pearson": 0.0, "spearmanr": 0.0}
        assert gm.compute_metrics(gt.TASKS["cola"], [1, 1, 1], [1, 1, 1]) == {
            "matthews_correlation": 0.0}
        assert gm.compute_metrics(gt.TASKS["cola"], [1, 1, 1], [0, 1, 1]) == {
            "matthews_correlation": 0.0}
        assert gm.compute_metrics(gt.TASKS["qqp"], [0, 0, 0], [0, 1, 1])["f1"] == 0.0
        assert gm.compute_metrics(gt.TASKS["qqp"], [0, 0], [0, 0])["f1"] == 0.0
    with pytest.raises(ValueError):
        gm.compute_metrics(gt.TASKS["rte"], [0, 2], [0, 1])  # class id out of range
    with pytest.raises(ValueError):
        gm.compute_metrics(gt.TASKS["rte"], [0], [0, 1])


def test_chance_score():
    assert gm.chance_score(gt.TASKS["mnli"], [0, 1, 1, 2, 1]) == pytest.approx(0.6)
    # best constant for F1: always predict the positive class, F1 = 2p / (1 + p)
    assert gm.chance_score(gt.TASKS["mrpc"], [1, 1, 0, 0, 0]) == pytest.approx(0.8 / 1.4)
    assert gm.chance_score(gt.TASKS["cola"], [1, 1, 0]) == 0.0
    assert gm.chance_score(gt.TASKS["stsb"], [0.5, 3.0, 4.0]) == 0.0


@needs_glue
def test_chance_score_on_real_dev():
    sst2 = gt.read_split(gt.TASKS["sst2"], GLUE_DIR, "dev").labels
    assert gm.chance_score(gt.TASKS["sst2"], sst2) == pytest.approx(444 / 872)
    mrpc = gt.read_split(gt.TASKS["mrpc"], GLUE_DIR, "dev").labels
    p = sum(mrpc) / len(mrpc)  # 279 / 408 equivalent
    assert gm.chance_score(gt.TASKS["mrpc"], mrpc) == pytest.approx(2 * p / (1 + p))


# ----------------------------------------------------------------------------- submissions


def test_submission_round_trip(tmp_path):
    mnli = gt.TASKS["mnli"]
    path = gm.write_submission(mnli, "test_matched", [0, 1, 2], [0, 1, 2], tmp_path / "sub")
    assert path == tmp_path / "sub" / "MNLI-m.tsv"
    assert path.read_text() == ("index\tprediction\n0\tentailment\n1\tneutral\n"
                                "2\tcontradiction\n")
    assert gm.read_submission(mnli, path) == ([0, 1, 2], [0, 1, 2])
    assert gm.write_submission(mnli, "diagnostic", [0], [1], tmp_path).name == "AX.tsv"

    rte = gm.write_submission(gt.TASKS["rte"], "test", [5, 6], np.array([1, 0]), tmp_path)
    assert rte.read_text().splitlines()[1:] == ["5\tnot_entailment", "6\tentailment"]
    cola = gm.write_submission(gt.TASKS["cola"], "test", [0, 1], [1, 0], tmp_path)
    assert cola.name == "CoLA.tsv" and cola.read_text().splitlines()[1:] == ["0\t1", "1\t0"]

    stsb = gm.write_submission(gt.TASKS["stsb"], "test", [0, 1, 2], [-0.3, 2.71828, 5.6],
                               tmp_path)
    assert stsb.read_text() == "index\tprediction\n0\t0.000\n1\t2.718\n2\t5.000\n"
    assert gm.read_submission(gt.TASKS["stsb"], stsb) == ([0, 1, 2], [0.0, 2.718, 5.0])

    with pytest.raises(UserError, match="test_matched, test_mismatched, diagnostic"):
        gm.write_submission(mnli, "test", [0], [0], tmp_path)
    with pytest.raises(ValueError):
        gm.write_submission(gt.TASKS["sst2"], "test", [0, 1], [0, 2], tmp_path)


@needs_glue
def test_submission_for_real_test_file(tmp_path):
    task = gt.TASKS["sst2"]
    test = gt.read_split(task, GLUE_DIR, "test")
    preds = np.random.default_rng(0).integers(0, 2, len(test)).tolist()
    path = gm.write_submission(task, "test", test.index, preds, tmp_path)
    assert path.name == "SST-2.tsv"
    assert gm.read_submission(task, path) == (test.index, preds)


# ----------------------------------------------------------------------------- hub (faked)


def test_hub_loader_maps_splits_and_labels(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, subset, split, cache_dir=None):
        calls.append((name, subset, split))
        label = -1 if split.startswith("test") else 2
        return datasets.Dataset.from_dict(
            {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [label, 0],
             "idx": [10, 11]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    mnli = gt.TASKS["mnli"]
    dev = gt.load_hub_split(mnli, "dev_mismatched")
    assert (dev.text_a, dev.text_b, dev.labels, dev.index) == (
        ["p0", "p1"], ["h0", "h1"], [2, 0], [10, 11])
    assert gt.load_hub_split(mnli, "test_matched").labels is None
    gt.load_hub_split(mnli, "diagnostic")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched"),
                     ("nyu-mll/glue", "mnli", "test_matched"), ("nyu-mll/glue", "ax", "test")]


def test_hub_failure_says_to_pass_data_dir(monkeypatch):
    datasets = pytest.importorskip("datasets")
    tried = []

    def offline(name, *args, **kwargs):
        tried.append(name)
        raise ConnectionError("Couldn't reach the hub\n(details)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        gt.load_hub_split(gt.TASKS["sst2"], "train")
    assert tried == ["nyu-mll/glue", "glue"]
    assert "--data_dir" in str(info.value) and "\n" not in str(info.value)
