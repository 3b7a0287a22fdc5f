"""ds_config resolution: auto values filled, disagreements refused. The shipped configs validate."""

import json
from pathlib import Path

import pytest

from lrcbert.runtime.ds_config import TrainerSettings, resolve_ds_config, zero_stage
from lrcbert.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SETTINGS = TrainerSettings(micro_batch_size=16, gradient_accumulation_steps=2, world_size=2,
                           gradient_clipping=1.0, precision="bf16")


@pytest.mark.parametrize("name", ["z0.json", "z1.json", "z2.json", "z3.json"])
def test_shipped_configs_resolve(name):
    cfg = resolve_ds_config(str(REPO / "ds_configs" / name), SETTINGS)
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == int(name[1]) == zero_stage(cfg)


def test_a_config_without_zero_section_is_stage_0(tmp_path):
    assert zero_stage(resolve_ds_config(_write(tmp_path, {}), SETTINGS)) == 0


def _write(tmp_path, cfg):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_batch_size_mismatch_is_refused(tmp_path):
    with pytest.raises(UserError, match="train_batch_size is 32 but micro batch 16 x accumulation 2 x world size 2 = 64"):
        resolve_ds_config(_write(tmp_path, {"train_batch_size": 32}), SETTINGS)


def test_micro_batch_disagreement_names_the_flag(tmp_path):
    with pytest.raises(UserError, match="--micro_batch_size"):
        resolve_ds_config(_write(tmp_path, {"train_micro_batch_size_per_gpu": 8}), SETTINGS)


def test_precision_disagreement(tmp_path):
    with pytest.raises(UserError, match="fp16.enabled is true but --precision is bf16"):
        resolve_ds_config(_write(tmp_path, {"fp16": {"enabled": True}}), SETTINGS)


def test_optimizer_section_is_refused(tmp_path):
    with pytest.raises(UserError, match='remove the "optimizer" section'):
        resolve_ds_config(_write(tmp_path, {"optimizer": {"type": "Adam"}}), SETTINGS)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(UserError, match="ds_config not found"):
        resolve_ds_config(str(tmp_path / "nope.json"), SETTINGS)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_ds_config(str(bad), SETTINGS)


def test_unknown_auto_is_refused(tmp_path):
    with pytest.raises(UserError, match="cannot fill \"auto\" for zero_optimization.reduce_bucket_size"):
        resolve_ds_config(_write(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}), SETTINGS)
