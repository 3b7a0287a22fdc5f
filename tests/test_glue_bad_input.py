"""Bad input: a one-line error naming the problem, exit status 2, nothing written or overwritten.

These fail in the recipe's setup, before any process group or model exists, so they run
in-process in milliseconds.
"""

import json
import shutil

import pytest
from transformers import BertConfig, BertForSequenceClassification

from finetune.glue import main
from tests.helpers import GLUE, make_tiny_encoder

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason=f"shared GLUE data not found at {GLUE}")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    encoder = make_tiny_encoder(root / "encoder", layers=4, hidden=32)
    two = BertForSequenceClassification.from_pretrained(encoder, num_labels=2,
                                                        id2label={0: "negative", 1: "positive"})
    two.save_pretrained(root / "sst2_teacher")
    shutil.copy(root / "encoder" / "tokenizer.json", root / "sst2_teacher")
    shutil.copy(root / "encoder" / "tokenizer_config.json", root / "sst2_teacher")
    # a student with another vocabulary
    other = BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    other.save_pretrained(root / "other_vocab_student")
    return root


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def base(teachers, out, task="sst2", folder="SST-2", teacher=None):
    return ["--task", task, "--data_dir", str(GLUE / folder), "--teacher", str(teacher or teachers / "sst2_teacher"),
            "--output_dir", str(out), "--max_steps", "2"]


def test_unknown_task(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--task", "sst3")
    assert_one_line_error(code, err, "sst3")
    assert not (tmp_path / "o").exists()


def test_missing_data_dir(teachers, tmp_path, capsys):
    args = base(teachers, tmp_path / "o")
    args[args.index("--data_dir") + 1] = str(tmp_path / "nowhere")
    assert_one_line_error(*run(capsys, *args), "nowhere")


def test_missing_train_file(teachers, tmp_path, capsys):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    shutil.copy(GLUE / "SST-2" / "dev.tsv", folder)
    args = base(teachers, tmp_path / "o")
    args[args.index("--data_dir") + 1] = str(folder)
    assert_one_line_error(*run(capsys, *args), "train.tsv")


@pytest.mark.parametrize("bad_row,needle", [("a sentence with no label\n", "column"),
                                            ("a sentence\t7\n", "7")])
def test_malformed_tsv_row(teachers, tmp_path, capsys, bad_row, needle):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for name in ("dev.tsv", "test.tsv"):
        shutil.copy(GLUE / "SST-2" / name, folder)
    lines = (GLUE / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)[:50]
    (folder / "train.tsv").write_text("".join(lines[:20]) + bad_row + "".join(lines[20:]))
    args = base(teachers, tmp_path / "o")
    args[args.index("--data_dir") + 1] = str(folder)
    assert_one_line_error(*run(capsys, *args), "train.tsv:21", needle)


def test_teacher_label_count_mismatch(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o", task="stsb", folder="STS-B"))
    assert_one_line_error(code, err, "2 labels", "stsb needs 1")


def test_teacher_label_order_mismatch(teachers, tmp_path, capsys):
    flipped = tmp_path / "flipped"
    shutil.copytree(teachers / "sst2_teacher", flipped)
    cfg = json.loads((flipped / "config.json").read_text())
    cfg["id2label"] = {"0": "positive", "1": "negative"}
    cfg["label2id"] = {"positive": 0, "negative": 1}
    (flipped / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run(capsys, *base(teachers, tmp_path / "o", teacher=flipped)), "label order")


def test_student_vocabulary_mismatch(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--student", str(teachers / "other_vocab_student"))
    assert_one_line_error(code, err, "vocabulary", "1000")


def test_ds_config_disagreeing_with_flags(teachers, tmp_path, capsys):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--ds_config", str(cfg), "--micro_batch_size", "16")
    assert_one_line_error(code, err, "train_micro_batch_size_per_gpu is 4", "--micro_batch_size gives 16")


def test_zero3_with_perturbation_is_refused(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--ds_config", "ds_configs/z3.json")
    assert_one_line_error(code, err, "ZeRO-3", "--perturb false")


def test_impossible_layer_map(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--student_layers", "6")
    assert_one_line_error(code, err, "6-layer student", "4-layer teacher")


def test_existing_output_dir_is_never_reused(teachers, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "eval_results.json").write_text('{"earlier": true}')
    code, err = run(capsys, *base(teachers, out))
    assert_one_line_error(code, err, "already holds a run", "--resume", "--overwrite_output_dir")
    assert (out / "eval_results.json").read_text() == '{"earlier": true}'
    code, err = run(capsys, *base(teachers, out), "--resume")
    assert_one_line_error(code, err, "no checkpoint")


def test_global_batch_larger_than_the_data(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--max_train_samples", "10")
    assert_one_line_error(code, err, "do not fill one global batch")


@pytest.mark.parametrize("steps", ["-5", "0"])
def test_a_step_count_that_is_not_positive_is_refused(teachers, tmp_path, capsys, steps):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--max_steps", steps)
    assert_one_line_error(code, err, "--max_steps", steps)
    assert not (tmp_path / "o").exists()


def test_bad_perturbation_radius_is_refused(teachers, tmp_path, capsys):
    code, err = run(capsys, *base(teachers, tmp_path / "o"), "--epsilon", "0")
    assert_one_line_error(code, err, "--epsilon")
