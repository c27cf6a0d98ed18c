"""Run directories and exports on local disk or on an object store (gs://, s3://, any URL etils.epath knows).

`resolve` gives the one path type the training loops use: an absolute `pathlib.Path` for a local path (behaviour as
before) or an `etils.epath.Path` for a URL; both have mkdir, read_text/write_text, open, glob and `/`, and orbax
takes either. gs:// goes through fsspec and needs `gcsfs` (the `tpu` extra). An object store can neither append to
a file nor rename one atomically: per-step logs go through `AppendFile`, and files that a library can only write
locally (safetensors, TensorBoard events) are written to local disk first and copied up with `copy`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from etils import epath

COPY_CHUNK = 64 << 20  # bytes per read/write when streaming a file between local disk and a store
SYNC_S = 60.0  # an AppendFile on a store rewrites its object at most this often (and always on close)


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object on a store (`scheme://...`) rather than a local file."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> Path | epath.Path:
    """An absolute local Path, or an epath.Path for a URL."""
    return epath.Path(os.fspath(path)) if is_url(path) else Path(path).absolute()


def copy(src: Path | epath.Path, dst: Path | epath.Path) -> None:
    """Stream one file from `src` to `dst` (either may be local or on a store) in COPY_CHUNK pieces."""
    with src.open("rb") as f, dst.open("wb") as out:
        shutil.copyfileobj(f, out, COPY_CHUNK)


class AppendFile:
    """A text file that lines are appended to (metrics.jsonl, consumed.process_N.jsonl, rc_states.jsonl).

    A local file is opened in append mode and `flush` flushes it, as a plain file. An object store cannot append:
    the object's text is read once, new lines are kept with it in memory, and the whole object is rewritten by
    `flush` at most every `sync_s` seconds and by `close`; a crash loses at most the last `sync_s` seconds of lines
    (a resumed run rewrites the steps after its checkpoint anyway).
    """

    def __init__(self, path: Path | epath.Path, sync_s: float = SYNC_S):
        self.path, self.sync_s = path, sync_s
        self.local = None if is_url(path) else open(path, "a")
        if self.local is None:
            self.parts = [path.read_text()] if path.exists() else []
            self.synced = time.monotonic()

    def write(self, text: str) -> None:
        if self.local is not None:
            self.local.write(text)
        else:
            self.parts.append(text)

    def flush(self, force: bool = False) -> None:
        if self.local is not None:
            self.local.flush()
        elif force or time.monotonic() - self.synced >= self.sync_s:
            self.parts = ["".join(self.parts)]
            self.path.write_text(self.parts[0])
            self.synced = time.monotonic()

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
        else:
            self.flush(force=True)
