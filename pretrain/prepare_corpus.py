"""Tokenize a text corpus into memory-mapped shards for general distillation.

    python pretrain/prepare_corpus.py --input wiki.train.raw,wiki.valid.raw \
        --tokenizer TEACHER_DIR --output_dir corpus/ --num_workers 8
    python pretrain/prepare_corpus.py --hub wikimedia/wikipedia --hub_config 20231101.en \
        --tokenizer TEACHER_DIR --output_dir corpus/ --num_workers 32

Rerun the same command after an interruption: finished shards are kept. What the corpus
holds and how it is cut is documented in lrcbert/data/corpus_build.py (the files in
lrcbert/data/corpus_format.py, documents and sentences in lrcbert/data/text.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lrcbert.config import parse_args  # noqa: E402
# no torch below: the spawned tokenizer workers re-import this script
from lrcbert.data.corpus_build import CorpusConfig, prepare_corpus  # noqa: E402
from lrcbert.errors import exit_on_user_error  # noqa: E402


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    config = parse_args(CorpusConfig, argv, description=__doc__)
    report = prepare_corpus(config)
    print(f"{config.output_dir}: {report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
