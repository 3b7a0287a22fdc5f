"""Typed flags: dataclasses become argparse parsers, field docs become ``--help``.

Each field's ``metadata={"help": ...}`` is its help text. Unknown flags are errors that
name the flag (argparse's own message). ``--local_rank`` (added by the DeepSpeed
launcher) is accepted and ignored: ranks come from the environment. A dataclass with a
``config`` field also takes ``--config FILE.json``: a JSON object of flag values that the
command line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any, TypeVar

from lrcbert.errors import UserError

T = TypeVar("T")


def flag(help: str, default: Any = dataclasses.MISSING, *, choices=None) -> Any:
    """A dataclass field that becomes ``--name``: ``help`` is its ``--help`` text, no ``default``
    makes it required, ``choices`` limits its values."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(tp):
    """Optional[X] / X | None -> X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    # required flags first, then the class's own, then inherited shared ones
    def required(f) -> bool:
        return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]

    ordered = sorted(dataclasses.fields(cls), key=lambda f: (not required(f), f.name not in own))
    for field in ordered:
        tp = _base_type(hints[field.name])
        kwargs: dict[str, Any] = {"help": field.metadata.get("help", "")}
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            kwargs["default"] = field.default_factory()  # type: ignore[misc]
        else:
            kwargs["required"] = True
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if tp is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = tp
        parser.add_argument(f"--{field.name}", **kwargs)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser


def load_json_object(path: str, what: str) -> dict:
    """A JSON object from ``path``, or a one-line UserError (missing file, bad JSON, not an object)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: {what} must be a JSON object")
    return value


def config_file_argv(cls: type, path: str) -> list[str]:
    """``--config FILE.json`` as command-line tokens, so argparse types and checks every value."""
    values = load_json_object(path, "--config file")
    known = {f.name: f for f in dataclasses.fields(cls)}
    argv = []
    for key, value in values.items():
        if key not in known or key == "config":
            raise UserError(f"{path}: unknown key {key!r} (keys are this recipe's flag names; see --help)")
        if value is None and known[key].default is None:
            continue
        if isinstance(value, bool):
            value = str(value).lower()
        elif not isinstance(value, (int, float, str)):
            raise UserError(f"{path}: {key} must be a number, string or boolean, got {json.dumps(value)}")
        argv += [f"--{key}", str(value)]
    return argv


def parse_args(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "config" in {f.name for f in dataclasses.fields(cls)}:
        # --config values go first so that flags on the command line override them
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config")
        config_path = pre.parse_known_args(argv)[0].config
        if config_path:
            argv = config_file_argv(cls, config_path) + argv
    parser = build_parser(cls, description or (cls.__doc__ or "").strip())
    ns = vars(parser.parse_args(argv))
    ns.pop("local_rank", None)
    return cls(**ns)
