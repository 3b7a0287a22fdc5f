"""Score an exported model on a GLUE dev split with plain transformers (or ONNX Runtime).

    python finetune/score.py --model runs/sst2-student/model --task sst2 --data_dir GLUE/SST-2
    python finetune/score.py --runtime onnx --model runs/sst2-student/model/onnx --task sst2 --data_dir GLUE/SST-2

The model is loaded with ``AutoModelForSequenceClassification.from_pretrained`` (SDPA
attention) and run by ``lrcbert.inference`` (length-bucketed batches, ``inference_mode``): the
unmodified Hugging Face model on the fast path a user of the export would take, so the figure
checks what that user will see. ``--runtime onnx`` scores a ``finetune/export.py`` folder
(``model.onnx``, or ``--onnx_file model.int8.onnx``) with ONNX Runtime and the same batching and metrics.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from lrcbert.data import glue, glue_metrics  # noqa: E402
from lrcbert.config import parse_args  # noqa: E402
from lrcbert.errors import UserError, exit_on_user_error  # noqa: E402
from lrcbert.inference import load_classifier_for_inference, predict_logits  # noqa: E402


@dataclass
class ScoreArgs:
    """Score a Hugging Face sequence classifier on GLUE dev splits."""

    model: str = field(metadata={"help": "exported model directory (OUTPUT_DIR/model)"})
    task: str = field(metadata={"help": "GLUE task"})
    data_dir: str = field(metadata={"help": "GLUE task folder with dev TSV files"})
    max_seq_length: int = field(default=128, metadata={"help": "truncation length"})
    max_eval_samples: int = field(default=-1, metadata={"help": "first N examples of each dev split"})
    batch_size: int = field(default=64, metadata={"help": "examples per batch"})
    runtime: str = field(default="pytorch", metadata={"help": "pytorch (a model dir) or onnx (an export dir)",
                                                      "choices": ["pytorch", "onnx"]})
    onnx_file: str = field(default="model.onnx", metadata={"help": "with --runtime onnx: the file in --model"})


def score(args: ScoreArgs) -> dict[str, dict[str, float]]:
    task = glue.get_task(args.task)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise UserError(f"--model {args.model} is not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.runtime == "onnx":
        from lrcbert.export import OnnxClassifier

        session = OnnxClassifier(os.path.join(args.model, args.onnx_file))
        forward = lambda a, b: session.predict_texts(tokenizer, a, b, args.max_seq_length,  # noqa: E731
                                                     args.batch_size)
    else:
        model = load_classifier_for_inference(args.model)
        forward = lambda a, b: predict_logits(model, tokenizer, a, b, args.max_seq_length,  # noqa: E731
                                              args.batch_size).numpy()
    results = {}
    for split in task.dev_splits:
        ex = glue.read_split(task, args.data_dir, split)
        n = len(ex) if args.max_eval_samples <= 0 else min(len(ex), args.max_eval_samples)
        logits = forward(ex.text_a[:n], ex.text_b[:n] if ex.text_b else None)
        preds = logits.reshape(-1) if task.is_regression else logits.argmax(-1)
        results[split] = glue_metrics.compute_metrics(task, preds, np.asarray(ex.labels[:n]))
    return results


@exit_on_user_error
def main(argv=None) -> int:
    print(json.dumps(score(parse_args(ScoreArgs, argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
