"""Rows of a data source (a local .jsonl / .json / .parquet file or folder, or a hub dataset id), each with where it
came from, so that every error about a row names the file and the 1-based line (JSONL) or row (other formats) a
user would look at. A JSONL line that is not a JSON object is a `Malformed` row (its error kept), which the callers'
`on_malformed` setting skips or refuses like any other unusable row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qednano_jax.config import UserError


class DataError(UserError):
    """A malformed row or an unreadable data source; the message names the file and line / row, and the field."""


class Malformed:
    """A JSONL line that could not be read as a JSON object."""

    def __init__(self, error: str):
        self.error = error


class Rows(list):
    """A list of rows with a label per row ("FILE line N" or "SOURCE row N", 1-based); slices keep their labels."""

    def __init__(self, rows=(), labels=()):
        super().__init__(rows)
        self.labels = list(labels)
        if len(self.labels) != len(self):
            raise ValueError(f"Rows: {len(self)} rows but {len(self.labels)} labels")

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Rows(list.__getitem__(self, k), self.labels[k])
        return list.__getitem__(self, k)

    def where(self, i: int) -> str:
        return self.labels[i]


def from_dataset(ds: Any, label: str) -> Rows:
    """The rows of a `datasets` Dataset, labelled "LABEL row N" (1-based)."""
    return Rows(ds.to_list(), [f"{label} row {i}" for i in range(1, len(ds) + 1)])


def check_mapping(rows: Rows, i: int) -> dict:
    """Row i as a dict, or DataError naming where it is (a line that is not JSON, or a JSON value that is no
    object)."""
    row = rows[i]
    if isinstance(row, Malformed):
        raise DataError(f"{rows.where(i)}: {row.error}")
    if not isinstance(row, dict):
        raise DataError(f"{rows.where(i)}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: Path) -> Rows:
    rows, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value: Any = json.loads(line)
            except json.JSONDecodeError as e:
                value = Malformed(f"not JSON ({e.msg} at column {e.colno})")
            rows.append(value)
            labels.append(f"{path} line {n}")
    return Rows(rows, labels)


def load_rows(path: str, *, name: str | None = None, split: str = "train", key: str = "data.path") -> Rows:
    """The rows of `path` (see the module doc); `key` is the config field named in errors. An empty source is an
    error too."""
    p = Path(path)
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if p.is_file():
        if p.suffix not in kind:
            raise DataError(f"{key}: {path}: unsupported data file (use .jsonl, .json or .parquet)")
        out = read_jsonl(p) if p.suffix == ".jsonl" else _via_datasets(kind[p.suffix], [p], str(p))
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in kind)
        if not files:
            raise DataError(f"{key}: {path}: the folder holds no .jsonl/.json/.parquet files")
        if all(f.suffix == ".jsonl" for f in files):
            out = _concat([read_jsonl(f) for f in files])
        else:
            same = [f for f in files if kind[f.suffix] == kind[files[0].suffix]]
            out = _via_datasets(kind[files[0].suffix], same, str(p))
    elif p.suffix in kind or str(path).startswith((".", "/")):
        raise DataError(f"{key}: {path} does not exist")
    else:
        try:
            import datasets
            ds = datasets.load_dataset(path, name, split=split)
        except Exception as e:  # noqa: BLE001 - offline, a wrong id or split: re-raised naming the key
            raise DataError(f"{key}: {path!r} is not a local file or folder and could not be loaded from the hub "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        out = from_dataset(ds, path)
    if not out:
        raise DataError(f"{key}: {path} holds no rows (an empty file)")
    return out


def _concat(parts: list[Rows]) -> Rows:
    return Rows([r for p in parts for r in p], [lab for p in parts for lab in p.labels])


def _via_datasets(kind: str, files: list[Path], label: str) -> Rows:
    import datasets
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
    except Exception as e:  # noqa: BLE001 - a file datasets cannot parse is the user's file, named here
        raise DataError(f"{label}: cannot read it as {kind} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    return from_dataset(ds, label)
