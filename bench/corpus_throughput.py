"""Corpus throughput: the general-distillation corpus pipeline against a bare tokenizer pass.

    python bench/corpus_throughput.py [--json] [--quick]

Text: the WikiText-2 files in ../shared/data/wikitext-2 (raw test split and the tokenized
valid and test splits, ``--copies`` times each). Two measurements, each with 1 and 2 worker
processes, interleaved in every repeat (median of repeats):

- ``pipeline``: ``lrcbert.data.corpus_build.prepare_corpus`` end to end (document reading,
  WikiText clean-up, sentence splitting, batched tokenization, packing, .npy shards with
  checksums, manifest), wall time of the whole call;
- ``bare``: the same files' lines through the tokenizer's Rust backend
  (``encode_batch_fast``, batches of 2048 lines, no special tokens), split over the same
  number of processes, wall time including starting them.

The pipeline emits fewer tokens than the bare pass from the same text (it undoes WikiText's
`` @-@ `` splits, maps ``<unk>`` to one [UNK], drops ``= = Section = =`` lines, and adds
[CLS]/[SEP] per sequence), so besides tokens/s the ratio of wall times on the same text is
reported (``pipeline_over_bare_same_text_*``).

Tokenizer threads are off (``TOKENIZERS_PARALLELISM=false``) so that workers, not Rust
threads, carry the parallelism in both, as ``prepare_corpus`` does with several workers.
Goals: pipeline at least 0.8x of bare; 2 workers near 2x of 1 worker.
"""

from __future__ import annotations

import os
import sys

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before any tokenizer is loaded
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

from bench.common import SHARED_DATA, Report, base_parser, offline_teacher_dir, plot_bars  # noqa: E402
from lrcbert.data.corpus_build import CorpusConfig, prepare_corpus  # noqa: E402

GOAL_OF_BARE = 0.8
FILES = ("wiki.test.raw", "wiki.valid.tokens", "wiki.test.tokens")
_BACKEND = {}


def _load_backend(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    _BACKEND["tok"] = Tokenizer.from_str(tokenizer_json)


def _count_tokens(lines: list[str]) -> int:
    tok = _BACKEND["tok"]
    return sum(len(e.ids) for start in range(0, len(lines), 2048)
               for e in tok.encode_batch_fast(lines[start:start + 2048], add_special_tokens=False))


def bare_pass(lines: list[str], tokenizer_json: str, workers: int) -> tuple[int, float]:
    """(tokens, seconds) of a batched Rust-tokenizer pass over ``lines`` on ``workers`` processes."""
    start = time.perf_counter()
    if workers == 1:
        _load_backend(tokenizer_json)
        tokens = _count_tokens(lines)
    else:
        chunks = [lines[i::4 * workers] for i in range(4 * workers)]  # 4 chunks per worker: even load
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_load_backend,
                                 initargs=(tokenizer_json,)) as pool:
            tokens = sum(pool.map(_count_tokens, chunks))
    return tokens, time.perf_counter() - start


def pipeline_pass(inputs: list[str], out_dir: str, workers: int, chars_per_shard: int) -> tuple[int, float, dict]:
    """(tokens written, seconds, manifest totals) of one prepare_corpus call into a fresh directory."""
    shutil.rmtree(out_dir, ignore_errors=True)
    config = CorpusConfig(output_dir=out_dir, tokenizer=offline_teacher_dir(), input=",".join(inputs),
                          num_workers=workers, chars_per_shard=chars_per_shard, progress=False)
    start = time.perf_counter()
    report = prepare_corpus(config)
    elapsed = time.perf_counter() - start
    m = report.manifest
    return report.tokens_written, elapsed, {k: m[k] for k in ("num_shards", "num_sequences", "num_tokens",
                                                              "num_sentences", "num_documents")}


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement (median)")
    parser.add_argument("--copies", type=int, default=2, help="each input file listed this many times")
    parser.add_argument("--chars_per_shard", type=int, default=400_000, help="shard size (several shards per worker)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if args.quick:
        args.repeats, args.copies, args.chars_per_shard = 1, 1, 300_000
    report = Report("corpus_throughput", args)
    tmp = tempfile.mkdtemp(prefix="lrcbert-corpus-bench-")
    try:
        files = [str(SHARED_DATA / "wikitext-2" / name) for name in FILES]
        if args.quick:  # one small file, first 200k characters
            small = os.path.join(tmp, "small.raw")
            with open(files[0], encoding="utf-8") as f, open(small, "w", encoding="utf-8") as g:
                g.write(f.read(600_000))
            files = [small]
        inputs = files * args.copies
        lines = []
        for path in inputs:
            with open(path, encoding="utf-8") as f:
                lines.extend(line.strip() for line in f if line.strip())
        chars = sum(map(len, lines))
        tokenizer_json = AutoTokenizer.from_pretrained(offline_teacher_dir()).backend_tokenizer.to_str()
        report.say(f"text: {len(inputs)} files, {len(lines):,} non-empty lines, {chars / 1e6:.1f}M characters; "
                   f"{os.cpu_count()} cores on this machine, {args.repeats} repeats")
        runs = {(kind, w): [] for w in (1, 2) for kind in ("bare", "pipeline")}
        totals = {}
        for _ in range(args.repeats):
            for kind, workers in runs:
                if kind == "bare":
                    tokens, seconds = bare_pass(lines, tokenizer_json, workers)
                else:
                    tokens, seconds, totals = pipeline_pass(inputs, os.path.join(tmp, "corpus"), workers,
                                                            args.chars_per_shard)
                runs[(kind, workers)].append((tokens, seconds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = {}
    for (kind, workers), samples in runs.items():
        seconds = statistics.median(s for _, s in samples)
        tokens = samples[0][0]
        rows[f"{kind}_{workers}w"] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                      "chars_per_s": chars / seconds, "seconds_all": [s for _, s in samples]}
    result = {"runs": rows, "pipeline_corpus": totals, "characters": chars, "lines": len(lines),
              "inputs": [os.path.basename(p) for p in inputs], "chars_per_shard": args.chars_per_shard}
    for w in (1, 2):
        result[f"pipeline_over_bare_{w}w"] = rows[f"pipeline_{w}w"]["tokens_per_s"] / rows[f"bare_{w}w"]["tokens_per_s"]
        # the same text in: the ratio of wall times (the pipeline emits fewer tokens, see the docstring)
        result[f"pipeline_over_bare_same_text_{w}w"] = rows[f"bare_{w}w"]["seconds"] / rows[f"pipeline_{w}w"]["seconds"]
    for kind in ("bare", "pipeline"):
        result[f"{kind}_scaling_2w_over_1w"] = rows[f"{kind}_2w"]["tokens_per_s"] / rows[f"{kind}_1w"]["tokens_per_s"]
    result["pipeline_tokens_over_bare_tokens"] = rows["pipeline_1w"]["tokens"] / rows["bare_1w"]["tokens"]
    result["goal_of_bare"] = GOAL_OF_BARE
    result["goal_met_of_bare"] = {f"{w}w": result[f"pipeline_over_bare_{w}w"] >= GOAL_OF_BARE for w in (1, 2)}
    result["goal_met_of_bare_same_text"] = {f"{w}w": result[f"pipeline_over_bare_same_text_{w}w"] >= GOAL_OF_BARE
                                            for w in (1, 2)}
    report.data.update(result)
    for name, row in rows.items():
        report.say(f"{name:>12}: {row['tokens']:>10,} tokens in {row['seconds']:.2f} s = {row['tokens_per_s']:,.0f} tokens/s")
    report.say(f"pipeline / bare, tokens/s: 1 worker x{result['pipeline_over_bare_1w']:.2f}, "
               f"2 workers x{result['pipeline_over_bare_2w']:.2f}; same text, by wall time: 1 worker "
               f"x{result['pipeline_over_bare_same_text_1w']:.2f}, 2 workers "
               f"x{result['pipeline_over_bare_same_text_2w']:.2f} (goal >= {GOAL_OF_BARE}); the pipeline emits "
               f"{result['pipeline_tokens_over_bare_tokens']:.2f}x the bare pass's tokens; "
               f"2 workers / 1 worker: pipeline x{result['pipeline_scaling_2w_over_1w']:.2f}, "
               f"bare x{result['bare_scaling_2w_over_1w']:.2f} (this machine has {os.cpu_count()} cores, shared)")
    series = {kind: [rows[f"{kind}_{w}w"]["chars_per_s"] / 1e6 for w in (1, 2)] for kind in ("bare", "pipeline")}
    report.finish(plot=lambda: plot_bars(report.path(".png"), "Corpus throughput on the same text (million "
                                         "characters / s)", ["1 worker", "2 workers"], series, "M characters / s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
