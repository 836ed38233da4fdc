"""Crash-safe file writes: everything is written to a temporary name, then renamed.

A run killed at any moment therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _recover(path: Path) -> None:
    """Undo what an earlier write of `path` that was killed left beside it: its temporaries, and an old
    version renamed aside whose replacement never arrived (put back, so `path` is the old state again)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)
    own = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")  # mkstemp's names, not a neighbour's
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if own.fullmatch(stale.name):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds. The file
    gets the permissions the umask gives a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds. The old
    version is renamed aside first; a run killed between the two renames is undone by the next write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, crash-safe."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file crash-safely."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    """Write JSON crash-safely, indented for people."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output(out: str | Path, inputs: list[str | Path], overwrite: bool, flag: str, folder: bool = True) -> None:
    """Refuse to write `out` (a folder, or a file with `folder=False`) where that would lose a user's files:
    over an existing non-empty one unless `overwrite`, and never over (or around) one of the inputs."""
    from .errors import OutputError

    out = Path(out).resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == out or out in source.parents:
            raise OutputError(f"{flag} {out}: it holds an input ({item}); write the output somewhere else")
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise OutputError(f"{flag} {out}: a parent of it is a file")
    if out.exists() and out.is_dir() != folder:
        found, wanted = ("file", "folder") if folder else ("folder", "file")
        raise OutputError(f"{flag} {out}: is a {found}; give a {wanted} path")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise OutputError(f"{flag} {out}: already exists and is not empty; pass --overwrite to replace it")
