"""bench/gpu_check.sh --dry-run on this CPU, and the kit check of bench/gpu_kit.py.

The dry run walks the GPU check's steps at tiny sizes: the kit check (the prepared
bench/gpu_kit when there is one, else the package lists, said on a note line), the CUDA tests
(they skip here), general distillation through pretrain/general_distill.py in bf16 (fp16 is
refused by a CPU without AVX512-FP16, which the JSON records) and fp16, inference_speed.py, and
one JSON file of the same shape as on the GPU with "dry_run": true. No network is needed.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

import pytest

from bench import gpu_kit
from tests.helpers import REPO, SHARED_DATA, run_group, tail, timeout


@timeout(900)
def test_dry_run_walks_every_step_and_writes_one_json(tmp_path):
    if not (SHARED_DATA / "wikitext-2" / "wiki.test.raw").is_file() and not (REPO / "bench" / "gpu_kit").is_dir():
        pytest.skip("needs ../shared/data or a prepared bench/gpu_kit")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out))
    proc = run_group(["bash", "bench/gpu_check.sh", "--dry-run"], timeout=880, env=env)
    assert proc.returncode == 0, tail(proc, 5000)
    text = proc.stdout + proc.stderr
    assert "kit complete" in text or "note: no kit folder" in text
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json"], "one JSON file, the kit's report inside"
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] is True and data["complete"] is True
    assert data["kit"]["ok"] is True
    tests = data["cuda_tests"]
    assert tests["exit_code"] in (0, 5) and tests["failed"] == 0
    assert tests["passed"] + tests["skipped"] == len(tests["tests"]) >= 5
    flops = data["flops"]
    per = flops["per_sample"]
    assert per["total"] == pytest.approx(per["teacher_forward"] + 5 * per["student_forward"])
    assert flops["peak_tflops"] == 989.0 and "formula" in flops
    runs = data["general_distillation"]["runs"]
    assert set(runs) == {"bf16_b4", "fp16_b4"}
    bf16 = runs["bf16_b4"]
    assert bf16["ok"], bf16
    for key in ("samples_per_s", "tokens_per_s", "mfu", "achieved_tflops"):
        assert math.isfinite(bf16[key]) and bf16[key] > 0, key
    assert bf16["tokens_per_s"] > bf16["samples_per_s"]
    fp16 = runs["fp16_b4"]
    assert fp16["ok"] or "fp16 is not supported" in fp16["error"], fp16
    inference = data["inference"]
    assert len(inference["settings"]) == 3
    for row in inference["settings"]:
        for path in ("fast", "fast_bf16", "fast_fp16"):
            assert row[path]["teacher_ms"] > 0 and row[path]["student_ms"] > 0
    assert set(data["peak_gpu_memory_bytes"]["general_distillation"]) == set(runs)


# ------------------------------------------------------------------------------------ the kit check

def fake_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> None:
    """A wheel file with just the metadata the kit check reads."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-{tag}.whl", "w") as z:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{dist}.dist-info/METADATA", meta + "\nDescription\n")
        z.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nTag: {tag}\n")


def fake_kit(root: Path, skip: str | None = None, extra_requires=()) -> Path:
    kit = root / "kit"
    (kit / "wheels").mkdir(parents=True)
    for name, version in {**gpu_kit.KIT_WHEELS, **gpu_kit.FALLBACK_WHEELS}.items():
        if name == skip:
            continue
        requires = {"pydantic": ["pydantic-core==2.46.4", "typing-extensions>=4.14.1", "annotated-types>=0.6.0"],
                    "deepspeed": ["torch", "hjson", "pydantic>=2.0.0", "sphinx; extra == 'docs'"]}.get(name, [])
        tag = "cp312-cp312-manylinux_2_17_x86_64" if name == "pydantic-core" else "py3-none-any"
        fake_wheel(kit / "wheels", name, version, [*requires, *(extra_requires if name == "deepspeed" else [])], tag)
    for rel in [f"data/{f}" for f in gpu_kit.DATA_FILES] + [f"tokenizer/{f}" for f in gpu_kit.TOKENIZER_FILES]:
        (kit / rel).parent.mkdir(parents=True, exist_ok=True)
        (kit / rel).write_text("x\n")
    files = {str(p.relative_to(kit)): {"bytes": p.stat().st_size, "sha256": gpu_kit.file_sha256(str(p))}
             for p in sorted(kit.rglob("*")) if p.is_file()}
    (kit / "MANIFEST.json").write_text(json.dumps({"kit_wheels": gpu_kit.KIT_WHEELS, "files": files}))
    return kit


def test_kit_check_accepts_a_complete_kit(tmp_path):
    report = gpu_kit.check(fake_kit(tmp_path))
    assert report["ok"], report["problems"]
    assert report["wheel_files_checked"] is True


def test_kit_check_names_what_is_missing(tmp_path):
    kit = fake_kit(tmp_path, skip="pydantic-core", extra_requires=["left-pad>=1"])
    (kit / "data" / gpu_kit.DATA_FILES[0]).write_text("changed\n")
    problems = gpu_kit.check(kit)["problems"]
    assert any("no wheel of pydantic-core==2.46.4" in p for p in problems), problems
    assert any("pydantic needs pydantic-core" in p for p in problems), problems
    assert any("deepspeed needs left-pad" in p for p in problems), problems
    assert any("SHA-256 differs" in p for p in problems), problems


def test_kit_check_without_a_kit_checks_the_lists(tmp_path):
    pytest.importorskip("deepspeed")
    report = gpu_kit.check(tmp_path / "absent")
    assert report["wheel_files_checked"] is False and "not checked" in report["note"]
    assert report["ok"], report["problems"]
    assert "hjson" in report["deepspeed_requirements"] and "pydantic" in report["deepspeed_requirements"]
