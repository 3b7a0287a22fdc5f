"""The exported model's card: ``model/README.md`` in the Hugging Face model card format.

YAML metadata (task, teacher, dataset, dev metrics as a ``model-index``) built with
``huggingface_hub``'s own card classes, so ``push_to_hub`` carries a card the hub reads; then
the recipe, the exact command and the method's citation.
"""

from __future__ import annotations

import os
import shlex
import sys

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CITATION = """@inproceedings{fu2021lrcbert,
  title     = {LRC-BERT: Latent-representation Contrastive Knowledge Distillation for Natural Language Understanding},
  author    = {Fu, Hao and Zhou, Shaojun and Yang, Qihong and Tang, Junjie and Liu, Guiquan and
               Liu, Kaikui and Li, Xiaolong},
  booktitle = {Proceedings of the AAAI Conference on Artificial Intelligence},
  year      = {2021},
  note      = {arXiv:2012.07335}
}"""


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The recipe's command as the user gave it (the launcher's ``--local_rank`` left out)."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith(("--local_rank", "--local-rank"))]
    return " ".join(shlex.quote(a) for a in [script, *args])


def write_model_card(model_dir: str, *, title: str, recipe: str, command: str, teacher: str,
                     parameters: int, task=None, results: dict[str, dict[str, float]] | None = None,
                     distilled: bool = True, perturbed: bool = True) -> str:
    """Write ``model_dir/README.md``; returns its path.

    ``task`` (a GLUE ``TaskSpec``) and ``results`` (dev split -> metric -> value) describe a
    task student; without them the card describes a general-distilled encoder.
    """
    eval_results = []
    for split, metrics in (results or {}).items():
        for name, value in metrics.items():
            eval_results.append(EvalResult(
                task_type="text-classification", dataset_type="nyu-mll/glue", dataset_name=f"GLUE {task.glue_name}",
                dataset_config=task.hub_subset, dataset_split=split.replace("dev", "validation"),
                metric_type=name, metric_value=float(value), metric_name=f"{split} {name}"))
    data = ModelCardData(
        language="en", library_name="transformers",
        pipeline_tag="text-classification" if task is not None else "feature-extraction",
        tags=["lrc-bert", "knowledge-distillation", "bert"],
        datasets=["nyu-mll/glue"] if task is not None else None,
        model_name=title if eval_results else None, eval_results=eval_results or None,
        teacher=teacher)
    if distilled:
        about = (f"A {parameters / 1e6:.1f}M-parameter student distilled with LRC-BERT (latent-representation "
                 "contrastive distillation: COS-NCE on intermediate layers, soft and hard prediction-layer "
                 f"losses{', gradient perturbation' if perturbed else '; without gradient perturbation'}) from the "
                 f"teacher `{teacher}`.")
    else:
        about = (f"A {parameters / 1e6:.1f}M-parameter teacher: `{teacher}` fine-tuned on the task, "
                 "to distill LRC-BERT students from.")
    lines = [f"# {title}", "", about, "", "## Recipe", "", recipe, "", "## Results", ""]
    if results:
        lines += ["| split | metric | value |", "|---|---|---|"]
        lines += [f"| {split} | {name} | {value:.4f} |" for split, metrics in results.items()
                  for name, value in metrics.items()]
    else:
        lines.append("A general-distilled encoder: fine-tune or task-distill it before use (no task metrics).")
    lines += ["", "## The exact command", "", "Run under the `deepspeed` launcher (or srun/torchrun) from the "
              "project's checkout:", "", "```", command, "```", "", "## Citation", "", "```bibtex",
              CITATION, "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = os.path.join(model_dir, "README.md")
    card.save(path)
    return path
