"""Text handling: the tokenizer, input files, documents and sentences.

Torch-free: the corpus builder's worker processes import this module, so ``transformers``
(which imports torch) is imported inside :func:`load_tokenizer` only.

Choices of ours (the paper is silent):
- A document is a WikiText article (a ``= Title =`` line starts one; ``= = Section = =``
  lines are skipped as text), a blank-line-separated block of a plain file, or one row of
  a hub dataset. A document longer than ``max_doc_chars`` is cut at a paragraph boundary
  (bounds memory; one forced break).
- WikiText's `` @-@ ``, `` @,@ ``, `` @.@ `` are undone (``guest-starring``); ``<unk>``
  becomes the tokenizer's unknown token. Other WikiText spacing (`` , ``) is kept.
- Sentences are split by one rule (:func:`split_sentences`) that never loses text.
"""

from __future__ import annotations

import codecs
import os
import re
from typing import Iterator

from lrcbert.errors import UserError

INPUT_FORMATS = ("auto", "raw", "tokens", "plain")
SPLITTER_VERSION = "rule-v1"  # bump when split_sentences changes its output


def load_tokenizer(name_or_dir: str, *, require_fast: bool = False):
    """The Hugging Face tokenizer at ``name_or_dir`` (local dir or hub name), or a one-line
    UserError. ``require_fast``: refuse one without a Rust ``tokenizers`` backend (the corpus
    builder tokenizes with the backend directly)."""
    from transformers import AutoTokenizer  # heavy (imports torch): only the main process needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as exc:  # noqa: BLE001 - hub, network, missing files: all the user's path
        raise UserError(f"cannot load a tokenizer from {name_or_dir!r}: "
                        f"{str(exc).splitlines()[0] if str(exc) else repr(exc)}") from None
    if require_fast and getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"tokenizer {name_or_dir} is not a fast (Rust `tokenizers`) tokenizer")
    return tokenizer


# ----------------------------------------------------------------------------- input files


def check_text_file(path: str) -> None:
    """UserError naming ``path`` when it is missing, empty (no non-blank text) or not UTF-8."""
    if not os.path.exists(path):
        raise UserError(f"input file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"input path is not a file: {path}")
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, has_text = 0, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 24)
            held = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise UserError(f"input file {path} is not valid UTF-8 (bad byte at offset "
                                f"{offset - held + exc.start})") from None
            has_text = has_text or bool(text.strip().lstrip("\ufeff"))
            if not chunk:
                break
            offset += len(chunk)
    if not has_text:
        raise UserError(f"input file {path} is empty" + (" (only whitespace)" if offset else ""))


def resolve_format(path: str, input_format: str) -> str:
    """``input_format``, or for ``auto`` the format the file suffix names (.raw, .tokens, else plain)."""
    if input_format != "auto":
        return input_format
    suffix = os.path.splitext(path)[1].lower()
    return {".raw": "raw", ".tokens": "tokens"}.get(suffix, "plain")


# ----------------------------------------------------------------------------- documents

_HEADING = re.compile(r"((?:= )+)(.*?)((?: =)+)")
_WIKITEXT_SEPARATOR = re.compile(r" @([-,.])@ ")


def _heading_level(line: str) -> int:
    """``= Title =`` -> 1, ``= = Section = =`` -> 2, ...; 0 for a text line (already stripped)."""
    match = _HEADING.fullmatch(line)
    if match is None or match.group(1).count("=") != match.group(3).count("="):
        return 0
    return match.group(1).count("=")


def clean_wikitext(line: str, unk_token: str | None) -> str:
    """Undo WikiText's `` @-@ `` / `` @,@ `` / `` @.@ `` and map ``<unk>`` to ``unk_token``."""
    line = _WIKITEXT_SEPARATOR.sub(r"\1", line)
    if unk_token is not None and "<unk>" in line:
        line = line.replace("<unk>", unk_token)
    return line


def _cut(paragraphs: list[str], max_doc_chars: int) -> Iterator[list[str]]:
    """One document as pieces of at most ``max_doc_chars`` (0: no limit), cut between paragraphs."""
    piece, chars = [], 0
    for paragraph in paragraphs:
        if piece and max_doc_chars and chars + len(paragraph) > max_doc_chars:
            yield piece
            piece, chars = [], 0
        piece.append(paragraph)
        chars += len(paragraph)
    if piece:
        yield piece


def iter_documents(path: str, fmt: str, unk_token: str | None = None,
                   max_doc_chars: int = 0) -> Iterator[list[str]]:
    """Documents of a local file as lists of paragraphs (see the module doc for the rules).

    ``fmt``: ``raw`` / ``tokens`` (WikiText) or ``plain``. Any line ending (LF, CRLF, CR).
    Streams: at most one document is held in memory.
    """
    wikitext = fmt in ("raw", "tokens")
    paragraphs: list[str] = []
    chars = 0
    with open(path, encoding="utf-8", newline=None) as f:
        for line in f:
            text = line.lstrip("\ufeff").strip()
            level = _heading_level(text) if wikitext and text else 0
            # a document ends at a level-1 heading (WikiText) or a blank line (plain)
            if paragraphs and (level == 1 or (not wikitext and not text)):
                yield paragraphs
                paragraphs, chars = [], 0
            if not text or level:
                continue  # headings are not text; WikiText's blank lines only separate paragraphs
            paragraph = clean_wikitext(text, unk_token) if wikitext else text
            if paragraphs and max_doc_chars and chars + len(paragraph) > max_doc_chars:
                yield paragraphs  # cut an over-long document between paragraphs
                paragraphs, chars = [], 0
            paragraphs.append(paragraph)
            chars += len(paragraph)
    if paragraphs:
        yield paragraphs


def open_hub_dataset(name: str, config_name: str | None, split: str):
    """A streamed `datasets` hub dataset (needs internet), or UserError."""
    try:
        import datasets

        return datasets.load_dataset(name, config_name, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - network, name, config: all the user's to fix
        raise UserError(f"cannot open hub dataset {name} (config {config_name}, split {split}): "
                        f"{str(exc).splitlines()[0] if str(exc) else exc!r}")


def iter_hub_documents(stream, max_doc_chars: int = 0, text_column: str = "text") -> Iterator[list[str]]:
    """One document per row; its non-blank lines are the paragraphs."""
    for row in stream:
        paragraphs = [line.strip() for line in row[text_column].splitlines() if line.strip()]
        yield from _cut(paragraphs, max_doc_chars)


# ----------------------------------------------------------------------------- sentences

_TERMINATOR = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")
_OPENERS = "\"'\u201c\u2018(["
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc no nos vol fig gen col lt sgt capt cmdr mt ft rev inc ltd co jan feb "
    "mar apr jun jul aug sep sept oct nov dec".split())


def _is_abbreviation(before: str) -> bool:
    """Whether the ``.`` right after ``before`` ends an abbreviation rather than a sentence."""
    if not before or before[-1].isspace():
        return False  # WikiText's " . ": a stand-alone full stop
    word = before.rsplit(None, 1)[-1].lstrip(_OPENERS)
    return (len(word) == 1 and word.isalpha()) or "." in word or word.lower() in _ABBREVIATIONS


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences with one rule.

    A boundary is the whitespace after a run of ``.``, ``!`` or ``?`` (plus any closing
    quotes or brackets) when the next word starts, after any opening quotes or brackets
    (spaced or not), with an upper-case letter or a digit. After a ``.`` there is no boundary when the word
    before it is a single letter (initials), contains a period (``U.S.``) or is a common
    abbreviation (``Mr.``, ``St.``, ``No.``, ...). Joining the sentences with spaces gives
    the paragraph back up to whitespace: splitting never loses text.
    """
    sentences, start = [], 0
    for match in _TERMINATOR.finditer(paragraph):
        following = paragraph[match.end():match.end() + 16].lstrip(_OPENERS + " ")[:1]  # WikiText: '. " He'
        if not (following.isupper() or following.isdigit()):
            continue
        if match.group()[0] == "." and _is_abbreviation(paragraph[start:match.start()]):
            continue
        sentences.append(paragraph[start:match.end()].strip())
        start = match.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences
