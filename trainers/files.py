"""Atomic writes: every file palgan writes appears whole or not at all.

``atomic_path(path)`` yields a temporary name beside ``path``; when the block ends without an
error the temporary file (or folder) is renamed onto ``path`` with ``os.replace``, which is
atomic on POSIX filesystems. On an error the temporary is removed and ``path`` is untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """``with atomic_path(p) as tmp: write(tmp)`` -> ``p`` holds what was written, or its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        publish(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file or folder onto ``path`` in one step (a folder replaces a folder)."""
    tmp, path = Path(tmp), Path(path)
    if path.is_dir() and tmp.is_dir():   # os.replace needs the old folder gone
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))
