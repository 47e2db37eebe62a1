"""Reading what a user points apm-bench at, and checking where it will write, before any work.

Every problem here is the user's to fix (a missing, binary or unreadable file; an output path that
is a file, under a file, or not writable), so each becomes one `ApmError` naming the path, never a
traceback, and it is raised before a run computes anything it would then fail to save.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from apm_bench.errors import ApmError, ConfigError


def read_text(path: Path | str, what: str, error: type[ApmError] = ConfigError) -> str:
    """The file's UTF-8 text; `what` names it in the error ("config file", "prompt file", ...)."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, through libyaml where PyYAML has it: the catalogs parse ten times faster."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 - a safe loader


def read_yaml(path: Path | str, what: str, error: type[ApmError] = ConfigError) -> Any:
    """The parsed YAML document (None for an empty file)."""
    text = read_text(path, what, error)
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise error(f"malformed YAML in {what} {path}: {getattr(exc, 'problem', None) or exc}") from None


def _existing_ancestor(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_dir(path: Path | str, what: str) -> Path:
    """A folder apm-bench may create (with its parents) and write into; checked, not created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {path} lies under {ancestor}, which is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} cannot be written: {ancestor} is read-only")
    return path


def check_output_file(path: Path | str, what: str) -> Path:
    """A file apm-bench may create or replace: not a folder, in a folder it can write."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} cannot be written: it is read-only")
    check_output_dir(path.parent, f"the folder of {what}")
    return path
