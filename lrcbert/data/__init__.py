"""Data for both stages: GLUE tasks and batches (task stage), the tokenized corpus (general stage).

- ``glue.py``: the GLUE task table (one keyword-argument ``TaskSpec`` per task), ``get_task``,
  ``Examples``, the TSV and hub readers, ``available_splits``, ``split_path``, ``load_examples``.
- ``glue_metrics.py``: the official metrics (``compute_metrics``), ``chance_score``, and the
  leaderboard submission files (``format_prediction``, ``write_submission``, ``read_submission``).
- ``batches.py``: encoded examples (``Encoded``, ``encode``), padded batches (``collate``), the
  data-parallel training order (``TrainOrder``, one integer cursor) and eval shards (``eval_shard``).
- ``text.py``: ``load_tokenizer`` (the one in the project), text-file checks, WikiText cleaning,
  documents of local files and hub datasets, sentence splitting.
- ``corpus_format.py``: what the corpus builder and reader share: format name and version,
  manifest and shard file names, token dtype, tokenizer identity, special ids, ``read_manifest``.
- ``corpus_build.py``: building the corpus (``CorpusConfig``, ``prepare_corpus``,
  ``PrepareReport``): packing, parallel tokenization, restartable shards.
- ``corpus.py``: reading it (``CorpusDataset``, ``check_compatible``, ``RankBatches``); it does
  not import the builder.

Importing this package imports nothing. ``text.py``, ``corpus_format.py`` and
``corpus_build.py`` are torch-free (the builder's worker processes import them); ``batches.py``
and ``corpus.py`` use torch.
"""
