"""The fast inference path for an exported model (``OUTPUT_DIR/model``), on plain transformers.

    model = load_classifier_for_inference(model_dir)
    logits = predict_logits(model, tokenizer, texts_a, texts_b, max_seq_length=128)

What makes it fast, each measured in ``bench/inference_speed.py``:
- SDPA attention (``attn_implementation="sdpa"``) and ``torch.inference_mode``;
- length-bucketed batches: examples are sorted by token count, so a batch is padded to
  the longest of similar lengths instead of to the longest in the data;
- a batch with no padding passes no attention mask, which lets SDPA skip the mask tensor.

``torch.compile`` is not used: on the 2-core CPU it was measured on (``bench/inference_speed.py
--compile``) it cost about 70 s of compilation per model and gained nothing beyond the noise.

The model itself is the unmodified Hugging Face one: ``from_pretrained`` on the directory.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification


def load_classifier_for_inference(model_dir: str, dtype: torch.dtype = torch.float32, **kwargs):
    """``AutoModelForSequenceClassification.from_pretrained`` with SDPA attention, in eval mode."""
    return AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa",
                                                              dtype=dtype, **kwargs).eval()


def length_buckets(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first; stable within a length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(input_ids: list[list[int]], token_type_ids: list[list[int]] | None, pad_id: int) -> dict:
    """(B, T) tensors padded to the longest row; ``attention_mask`` only when some row is padded."""
    length = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(input_ids), length), dtype=torch.long)
    mask = torch.zeros((len(input_ids), length), dtype=torch.long)
    for i, row in enumerate(input_ids):
        ids[i, :len(row)] = torch.tensor(row)
        if token_type_ids is not None:
            types[i, :len(row)] = torch.tensor(token_type_ids[i])
        mask[i, :len(row)] = 1
    batch = {"input_ids": ids, "token_type_ids": types}
    if not bool(mask.all()):
        batch["attention_mask"] = mask  # no mask at all when nothing is padded: SDPA needs none
    return batch


def tokenize(tokenizer, text_a: list[str], text_b: list[str] | None, max_seq_length: int) -> dict:
    """Unpadded token ids (one batched fast-tokenizer call)."""
    return tokenizer(text_a, text_b, truncation=True, max_length=max_seq_length, return_token_type_ids=True)


@torch.inference_mode()
def predict_encoded(model, input_ids: list[list[int]], token_type_ids: list[list[int]] | None, pad_id: int,
                    batch_size: int = 64) -> torch.Tensor:
    """(N, num_labels) fp32 logits on the CPU, in input order, from length-bucketed batches (on the
    model's device: a model on a GPU gets its batches there)."""
    if not input_ids:
        return torch.zeros(0, model.config.num_labels)
    out: list[torch.Tensor | None] = [None] * len(input_ids)
    for rows in length_buckets([len(ids) for ids in input_ids], batch_size):
        batch = pad_batch([input_ids[r] for r in rows],
                          [token_type_ids[r] for r in rows] if token_type_ids is not None else None, pad_id)
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()
        for r, logit in zip(rows, logits):
            out[r] = logit
    return torch.stack(out).cpu()


def predict_logits(model, tokenizer, text_a: list[str], text_b: list[str] | None = None,
                   max_seq_length: int = 128, batch_size: int = 64) -> torch.Tensor:
    """(N, num_labels) fp32 logits for raw texts (pairs when ``text_b`` is given), in input order."""
    enc = tokenize(tokenizer, text_a, text_b, max_seq_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return predict_encoded(model, enc["input_ids"], enc.get("token_type_ids"), pad_id, batch_size)
