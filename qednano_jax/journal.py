"""Append-only JSONL journals (eval results, data-generation output): one helper shared by every resumable writer."""

from __future__ import annotations

import os
from pathlib import Path


def cut_torn_line(path: str | os.PathLike) -> None:
    """Cut a torn last line (no trailing newline: the process died mid-write), so appends stay valid JSONL."""
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            f.flush()
            os.fsync(f.fileno())
