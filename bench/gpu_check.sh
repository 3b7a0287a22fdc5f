#!/usr/bin/env bash
# The GPU check, for one NVIDIA GPU on a machine that reaches no network (the H200 the device
# tool lends). Three modes:
#
#   bash bench/gpu_check.sh --prepare   # here, where PyPI answers: fill bench/gpu_kit (git ignores it)
#   bash bench/gpu_check.sh --run       # there: install the kit's wheels offline, then the check
#   bash bench/gpu_check.sh --dry-run   # any CPU: the same steps at tiny sizes, no GPU, no network
#
# --run: checks the kit (sizes, SHA-256, wheel closure), installs DeepSpeed and what it lacks
# there with `pip install --no-index --find-links bench/gpu_kit/wheels`, puts this checkout on
# PYTHONPATH (the project itself is not installed), points the benchmarks at the kit's data and
# tokenizer, and runs bench/gpu_check.py: the CUDA tests (pytest -m cuda), general-distillation
# samples/s, tokens/s and MFU in bf16 and fp16, inference speed, peak GPU memory; one JSON file,
# $OUT/gpu_check.json when OUT is set (the device tool brings $OUT back), else
# bench/results/gpu_check.json (a dry run's: a temporary folder). The whole check is held under
# 8 minutes (timeout).
#
# --dry-run: checks the kit if there is one, else the package lists it would be made from
# (said so on a note line); then bench/gpu_check.py --dry-run on the CPU. Data and tokenizer
# come from the kit when it has them, else from ../shared/data and the offline MiniLM package.
#
# Environment: PYTHON (default python3), KIT (default bench/gpu_kit), OUT, GPU_CHECK_TIMEOUT
# (seconds, default 460 for --run).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
KIT="${KIT:-bench/gpu_kit}"
MODE="${1:-}"
shift || true

use_kit_data() {
    if [ -f "$KIT/data/wikitext-2/wiki.test.raw" ] && [ -f "$KIT/tokenizer/vocab.txt" ]; then
        export LRCBERT_DATA_DIR="$PWD/$KIT/data" LRCBERT_TOKENIZER_DIR="$PWD/$KIT/tokenizer"
        echo "data and tokenizer: $KIT"
    else
        echo "note: no data in $KIT; data from ../shared/data, tokenizer from the offline MiniLM package"
    fi
}

report_file() {  # the kit check's report: a temporary file, copied into the check's one JSON
    mktemp --suffix=-gpu_kit_check.json
}

case "$MODE" in
--prepare)
    "$PYTHON" bench/gpu_kit.py prepare --kit "$KIT" "$@"
    du -sh "$KIT"
    ;;
--run)
    start=$(date +%s)
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cuda
    report=$(report_file)
    "$PYTHON" bench/gpu_kit.py check --kit "$KIT" --report "$report"
    # only the kit's pinned packages are asked for; pip resolves their needs against what the
    # machine has, and takes a kit wheel (typing-extensions) only where the machine's is too old
    reqs=$("$PYTHON" -c 'import json,sys; m=json.load(open(sys.argv[1]+"/MANIFEST.json")); print(" ".join(f"{k}=={v}" for k, v in m["kit_wheels"].items()))' "$KIT")
    "$PYTHON" -m pip install --no-index --find-links "$KIT/wheels" --no-cache-dir --no-compile \
        --disable-pip-version-check --root-user-action=ignore $reqs
    "$PYTHON" -c 'import deepspeed, pydantic, hjson; print("deepspeed", deepspeed.__version__, "installed")'
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    use_kit_data
    left=$(( ${GPU_CHECK_TIMEOUT:-460} - ($(date +%s) - start) ))
    timeout --signal=TERM --kill-after=15 "$left" "$PYTHON" bench/gpu_check.py --kit_report "$report" "$@"
    ;;
--dry-run)
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    report=$(report_file)
    "$PYTHON" bench/gpu_kit.py check --kit "$KIT" --report "$report"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    use_kit_data
    "$PYTHON" bench/gpu_check.py --dry-run --kit_report "$report" "$@"
    ;;
*)
    echo "usage: bash bench/gpu_check.sh --prepare | --run | --dry-run [bench/gpu_check.py flags]" >&2
    exit 2
    ;;
esac
