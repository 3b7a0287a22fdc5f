"""The GPU check's kit: what a GPU machine without any network needs beside the checkout.

    python bench/gpu_kit.py prepare [--kit bench/gpu_kit]   # here, where PyPI answers
    python bench/gpu_kit.py check [--kit bench/gpu_kit]     # anywhere: is the kit complete?

The GPU machine (an H200 lent through the device tool) has Python 3.12 with PyTorch (CUDA),
transformers, tokenizers, tensorboard, mpi4py, sentencepiece, scikit-learn, scipy and most of
what DeepSpeed imports (``ON_GPU_MACHINE``), but not DeepSpeed itself nor ``hjson`` and the
pydantic family it needs. ``prepare`` puts into the kit folder (git ignores it):

- ``wheels/``: those packages as wheels for CPython 3.12 on manylinux x86-64, pinned to the
  versions this checkout is tested with (``KIT_WHEELS``); DeepSpeed as the pure-Python wheel
  that ``pip wheel`` builds from its source (no compiled ops: DeepSpeed compiles what it needs
  at run time, and this project's training needs none). ``FALLBACK_WHEELS`` are installed
  there only when the machine's own copy is too old for a kit wheel.
- ``data/``: the files the check reads, laid out as ``../shared/data`` (WikiText-2's raw test
  split for the general-distillation corpus, SST-2 dev for inference) - copies for that one
  machine, never committed;
- ``tokenizer/``: the uncased BERT tokenizer files (no weights: the check's models are random);
- ``MANIFEST.json``: every file's size and SHA-256, and the package lists below.

``check`` verifies the manifest (sizes, hashes, under ``KIT_LIMIT_BYTES``), one wheel per
kit package with the right tags, and that every requirement of every kit wheel, and every
install requirement of this project (setup.py), is in the kit or on the GPU machine. Without
a kit folder it checks what it can without one: that DeepSpeed's requirements (read from the
DeepSpeed installed here; a note says so when its version is not the kit's) and this project's are all covered
by the lists, and says that the wheel files were not checked.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lrcbert.data.corpus_format import file_sha256  # noqa: E402  (numpy only: runs before the kit installs)
DEFAULT_KIT = REPO / "bench" / "gpu_kit"
KIT_LIMIT_BYTES = 60 * 2**20  # the device tool carries 64 MiB in all, the checkout included

# Not on the GPU machine's Python 3.12: carried as wheels (our tested versions).
KIT_WHEELS = {
    "deepspeed": "0.19.8",
    "hjson": "3.1.0",
    "pydantic": "2.13.4",
    "pydantic-core": "2.46.4",
    "annotated-types": "0.7.0",
    "typing-inspection": "0.4.2",
}
# On the machine, but pydantic needs typing-extensions >= 4.14.1: pip takes this one only if
# the machine's copy is older.
FALLBACK_WHEELS = {"typing-extensions": "4.16.0"}
# Installed on the GPU machine's image (the device tool's package list), as far as DeepSpeed,
# this project and the check need them.
ON_GPU_MACHINE = frozenset({
    "torch", "numpy", "einops", "msgpack", "ninja", "packaging", "psutil", "py-cpuinfo", "tqdm",
    "nvidia-ml-py", "transformers", "tokenizers", "safetensors", "huggingface-hub", "sentencepiece",
    "tensorboard", "scikit-learn", "scipy", "mpi4py", "typing-extensions", "pyyaml", "regex", "filelock",
    "fsspec", "requests", "pytest", "onnxruntime", "onnx", "onnxscript", "protobuf", "setuptools",
})
# This project's install requirements that the check never imports, with the reason.
NOT_NEEDED = {"datasets": "only streamed hub corpora import it, and the GPU machine reaches no hub"}

DATA_FILES = ("wikitext-2/wiki.test.raw", "GLUE/SST-2/dev.tsv")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
GPU_PYTHON = "3.12"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: list[str] | None, python_version: str = GPU_PYTHON) -> list[str]:
    """Names of the unconditional requirements (no extras; markers judged for the GPU machine)."""
    from packaging.requirements import Requirement

    names = []
    for line in lines or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"python_version": python_version, "extra": "",
                                                               "sys_platform": "linux", "platform_system": "Linux",
                                                               "platform_machine": "x86_64"}):
            continue
        names.append(normalize(req.name))
    return names


def project_requirements() -> list[str]:
    """setup.py's ``install_requires``, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return requirement_names(ast.literal_eval(node.value))
    raise SystemExit("setup.py: no install_requires found")


def wheel_metadata(path: Path) -> tuple[str, str, list[str], list[str]]:
    """(name, version, Requires-Dist lines, tags) of a wheel file."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        wheel = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
        text = z.read(meta).decode()
        tags = [line.split(":", 1)[1].strip() for line in z.read(wheel).decode().splitlines()
                if line.startswith("Tag:")]
    fields = [line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line]
    name = next(v.strip() for k, v in fields if k == "Name")
    version = next(v.strip() for k, v in fields if k == "Version")
    return name, version, [v.strip() for k, v in fields if k == "Requires-Dist"], tags


def tag_fits(tag: str) -> bool:
    """A wheel tag CPython 3.12 on manylinux x86-64 can install."""
    python, abi, platform = tag.split("-")
    return (python in ("py3", "cp312") and abi in ("none", "abi3", "cp312")
            and (platform == "any" or (platform.startswith("manylinux") and platform.endswith("x86_64"))))


def uncovered(names: list[str], kit: set[str]) -> list[str]:
    return sorted({n for n in names if n not in kit and n not in ON_GPU_MACHINE and n not in NOT_NEEDED})


# ------------------------------------------------------------------------------------ check

def check(kit: Path) -> dict:
    """What is (not) in order; ``ok`` is False with ``problems`` listed when something is missing."""
    problems: list[str] = []
    kit_names = set(KIT_WHEELS) | set(FALLBACK_WHEELS)
    report: dict = {"kit": str(kit), "kit_wheels": KIT_WHEELS, "fallback_wheels": FALLBACK_WHEELS}
    project = project_requirements()
    report["project_requirements_uncovered"] = uncovered(project, kit_names)
    if not kit.is_dir():
        report["wheel_files_checked"] = False
        report["note"] = (f"no kit folder at {kit}: the wheel files were not checked (run "
                          "'bash bench/gpu_check.sh --prepare' where PyPI answers); checked instead that "
                          "DeepSpeed's and this project's requirements are covered by the lists")
        try:
            installed = importlib.metadata.version("deepspeed")
            ds_reqs = requirement_names(importlib.metadata.requires("deepspeed"))
        except importlib.metadata.PackageNotFoundError:
            installed, ds_reqs = None, []
            problems.append("deepspeed is not installed here: its requirements cannot be read")
        if installed is not None and installed != KIT_WHEELS["deepspeed"]:
            report["note"] += (f"; DeepSpeed's requirements were read from deepspeed {installed} installed here, "
                               f"not from the kit's {KIT_WHEELS['deepspeed']}")
        report["deepspeed_installed_here"] = installed
        report["deepspeed_requirements"] = ds_reqs
        report["deepspeed_requirements_uncovered"] = uncovered(ds_reqs, kit_names)
        problems += [f"deepspeed needs {n}: neither in the kit nor on the GPU machine"
                     for n in report["deepspeed_requirements_uncovered"]]
    else:
        report["wheel_files_checked"] = True
        manifest_path = kit / "MANIFEST.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
        if not manifest_path.is_file():
            problems.append(f"{manifest_path} is missing: run the preparation again")
        total = 0
        for rel, entry in manifest["files"].items():
            path = kit / rel
            if not path.is_file():
                problems.append(f"{rel}: listed in the manifest, not in the kit")
                continue
            total += path.stat().st_size
            if path.stat().st_size != entry["bytes"] or file_sha256(str(path)) != entry["sha256"]:
                problems.append(f"{rel}: size or SHA-256 differs from the manifest")
        report["kit_bytes"] = total
        if total > KIT_LIMIT_BYTES:
            problems.append(f"the kit holds {total / 2**20:.1f} MiB, over {KIT_LIMIT_BYTES / 2**20:.0f} MiB")
        wheels: dict[str, dict] = {}
        for path in sorted((kit / "wheels").glob("*.whl")):
            name, version, requires, tags = wheel_metadata(path)
            key = normalize(name)
            if key in wheels:
                problems.append(f"two wheels of {key}: {wheels[key]['file']} and {path.name}")
            wheels[key] = {"file": path.name, "version": version, "requires": requirement_names(requires),
                           "tags": tags}
            if not any(tag_fits(t) for t in tags):
                problems.append(f"{path.name}: tags {tags} do not fit CPython {GPU_PYTHON} on manylinux x86-64")
        for name, version in {**KIT_WHEELS, **FALLBACK_WHEELS}.items():
            if name not in wheels:
                problems.append(f"no wheel of {name}=={version} in {kit / 'wheels'}")
            elif wheels[name]["version"] != version:
                problems.append(f"{wheels[name]['file']}: version {wheels[name]['version']}, the kit pins {version}")
        for name, info in wheels.items():
            for missing in uncovered(info["requires"], set(wheels)):
                problems.append(f"{name} needs {missing}: neither in the kit nor on the GPU machine")
        report["wheels"] = {k: {"file": v["file"], "requires": v["requires"]} for k, v in wheels.items()}
        for rel in [f"data/{f}" for f in DATA_FILES] + [f"tokenizer/{f}" for f in TOKENIZER_FILES]:
            if not (kit / rel).is_file():
                problems.append(f"{rel} is missing from the kit")
    problems += [f"this project needs {n}: neither in the kit nor on the GPU machine"
                 for n in report["project_requirements_uncovered"]]
    report["problems"] = problems
    report["ok"] = not problems
    return report


# ------------------------------------------------------------------------------------ prepare

def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(kit: Path, data_dir: Path, tokenizer: str) -> dict:
    """Fill ``kit`` afresh (wheels, data, tokenizer, manifest); returns the check's report."""
    if kit.exists():
        shutil.rmtree(kit)
    wheels = kit / "wheels"
    wheels.mkdir(parents=True)
    platform_flags = [flag for p in PLATFORMS for flag in ("--platform", p)]
    binary = {k: v for k, v in {**KIT_WHEELS, **FALLBACK_WHEELS}.items() if k != "deepspeed"}
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
        "--implementation", "cp", *platform_flags, "-d", str(wheels), *[f"{k}=={v}" for k, v in binary.items()])
    # DeepSpeed ships only its source: build the pure-Python wheel here (DS_BUILD_OPS unset: no ops
    # compiled; the build reads the torch installed here, hence no build isolation)
    with tempfile.TemporaryDirectory() as tmp:
        env_build = dict(os.environ)
        env_build.pop("DS_BUILD_OPS", None)
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp,
               f"deepspeed=={KIT_WHEELS['deepspeed']}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env_build)
        for path in Path(tmp).glob("deepspeed-*.whl"):
            shutil.copy(path, wheels / path.name)
    for rel in DATA_FILES:
        target = kit / "data" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, target)
    (kit / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer) / name, kit / "tokenizer" / name)
    files = {str(p.relative_to(kit)): {"bytes": p.stat().st_size, "sha256": file_sha256(str(p))}
             for p in sorted(kit.rglob("*")) if p.is_file()}
    manifest = {"gpu_python": GPU_PYTHON, "kit_wheels": KIT_WHEELS, "fallback_wheels": FALLBACK_WHEELS,
                "files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    (kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return check(kit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["prepare", "check"])
    parser.add_argument("--kit", default=str(DEFAULT_KIT), help="the kit folder (git ignores bench/gpu_kit)")
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"),
                        help="prepare: where the data files are copied from")
    parser.add_argument("--report", help="also write the check's report (JSON) to this file")
    args = parser.parse_args(argv)
    kit = Path(args.kit)
    if args.action == "prepare":
        from bench.common import tokenizer_dir

        report = prepare(kit, Path(args.data_dir), tokenizer_dir())
    else:
        report = check(kit)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    if report.get("note"):
        print(f"note: {report['note']}", flush=True)
    for problem in report["problems"]:
        print(f"kit problem: {problem}", file=sys.stderr, flush=True)
    if report["ok"]:
        size = f", {report['kit_bytes'] / 2**20:.1f} MiB" if "kit_bytes" in report else ""
        print(f"kit {'complete' if report['wheel_files_checked'] else 'lists complete'}: {kit}{size}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
