"""Deduplication and benchmark decontamination of problem sets (docs/recipe.md §2: "decontaminated against IMO-ProofBench
and ProofBench", "fuzzy and exact dedup").

    python -m qednano_jax.data.dedup configs/datagen/distill.yaml [key=value ...]

Every problem text is normalised (`normalize`: Unicode NFKC, lower case, every run of characters other than letters
and digits -> one space) and cut into word n-gram shingles (`dedup.ngram`). Rows are visited in input order:

1. exact duplicate: the normalised text equals that of an earlier kept row (blake2b hash);
2. near duplicate: the Jaccard similarity |A & B| / |A | B| of the shingle sets with an earlier kept row is
   >= `dedup.threshold`. Candidates come from MinHash LSH (`num_perm` hashes in `bands` bands) and every candidate
   is verified with the exact Jaccard, so the threshold is exact and only recall depends on the LSH;
3. contaminated: the shingle overlap |A & B| / min(|A|, |B|) with some benchmark problem (the eval formats, read
   by eval.benchmarks.load_benchmark) is >= `dedup.decontam_threshold`, or the normalised texts are equal. The
   overlap coefficient also catches a benchmark problem quoted inside a longer text. Benchmark shingles are in an
   inverted index, so every benchmark item sharing a shingle is compared exactly.

A row is checked against benchmarks first, then against earlier kept rows. The kept rows (all columns) go to
`dedup.output`; `<output stem>.report.json` lists every removed row with the reason, the row or benchmark item it
matched and the similarity, and a summary is printed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from qednano_jax.config import DataGenConfig
from qednano_jax.data.rows import DataError, check_mapping, load_rows

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, lower case, non-alphanumeric runs -> one space, stripped (LaTeX markup differences vanish)."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_hash(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).hexdigest()


def shingles(text: str, n: int) -> frozenset[str]:
    """Word n-grams of the normalised text (the whole text as one shingle when it has fewer than n words)."""
    words = normalize(text).split()
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def overlap(a: frozenset, b: frozenset) -> float:
    return len(a & b) / min(len(a), len(b)) if a and b else 0.0


class MinHashLSH:
    """MinHash signatures (`num_perm` multiply-shift hashes ((a*x + b) mod 2^64) >> 32 of 32-bit shingle hashes,
    a odd) banded for candidate search: two sets land in a common bucket with probability 1 - (1 - J^r)^b for
    r = num_perm / bands."""

    def __init__(self, num_perm: int, bands: int, seed: int = 0):
        if num_perm % bands:
            raise DataError(f"dedup.bands: {bands} must divide dedup.num_perm {num_perm}")
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64)
        self.bands, self.rows = bands, num_perm // bands
        self.buckets: dict[tuple[int, bytes], list[int]] = collections.defaultdict(list)

    def signature(self, sh: Iterable[str]) -> np.ndarray:
        x = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little") for s in sh],
                     dtype=np.uint64)
        if x.size == 0:
            return np.zeros(len(self.a), np.uint64)
        h = (self.a[:, None] * x[None, :] + self.b[:, None]) >> np.uint64(32)  # uint64 arithmetic wraps mod 2^64
        return h.min(axis=1)

    def _keys(self, sig: np.ndarray):
        return [(i, sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]

    def candidates(self, sig: np.ndarray) -> set[int]:
        return {j for k in self._keys(sig) for j in self.buckets.get(k, ())}

    def insert(self, sig: np.ndarray, item: int) -> None:
        for k in self._keys(sig):
            self.buckets[k].append(item)


def load_benchmark_items(specs: Iterable[str]) -> list[dict]:
    """`format=source` specs -> [{benchmark, id, problem}] through eval.benchmarks.load_benchmark."""
    from qednano_jax.eval.benchmarks import load_benchmark

    items = []
    for spec in specs:
        fmt, _, source = spec.partition("=")
        for p in load_benchmark(fmt.strip(), source.strip() or "sample"):
            items.append({"benchmark": f"{fmt.strip()}={source.strip() or 'sample'}", "id": p.id, "problem": p.problem})
    return items


def dedup(texts: list[str], benchmark_items: list[dict], *, ngram: int = 5, threshold: float = 0.6,
          decontam_threshold: float = 0.6, num_perm: int = 256, bands: int = 64) -> tuple[list[int], list[dict]]:
    """(kept row indices, removals). A removal is {index, reason: exact|near|benchmark, similarity, and matched_index
    (exact/near: the earlier kept row) or benchmark + benchmark_id}."""
    bench_sh = [shingles(b["problem"], ngram) for b in benchmark_items]
    bench_hash = {text_hash(b["problem"]): j for j, b in enumerate(benchmark_items)}
    index: dict[str, list[int]] = collections.defaultdict(list)
    for j, sh in enumerate(bench_sh):
        for s in sh:
            index[s].append(j)
    lsh = MinHashLSH(num_perm, bands)
    kept, removed = [], []
    first_of_hash: dict[str, int] = {}
    kept_sh: dict[int, frozenset] = {}
    for i, text in enumerate(texts):
        h, sh = text_hash(text), shingles(text, ngram)
        hit = _benchmark_hit(h, sh, bench_hash, bench_sh, index, decontam_threshold)
        if hit is not None:
            j, sim = hit
            removed.append({"index": i, "reason": "benchmark", "benchmark": benchmark_items[j]["benchmark"],
                            "benchmark_id": benchmark_items[j]["id"], "similarity": round(sim, 4)})
            continue
        if h in first_of_hash:
            removed.append({"index": i, "reason": "exact", "matched_index": first_of_hash[h], "similarity": 1.0})
            continue
        sig = lsh.signature(sh)
        best = max(((jaccard(sh, kept_sh[j]), -j) for j in lsh.candidates(sig)), default=None)
        if best is not None and best[0] >= threshold:
            removed.append({"index": i, "reason": "near", "matched_index": -best[1], "similarity": round(best[0], 4)})
            continue
        kept.append(i)
        first_of_hash[h] = i
        kept_sh[i] = sh
        lsh.insert(sig, i)
    return kept, removed


def _benchmark_hit(h, sh, bench_hash, bench_sh, index, threshold) -> tuple[int, float] | None:
    if h in bench_hash:
        return bench_hash[h], 1.0
    counts = collections.Counter(j for s in sh for j in index.get(s, ()))
    best = max(((c / min(len(sh), len(bench_sh[j])), -j) for j, c in counts.items()), default=None)
    return (-best[1], best[0]) if best is not None and best[0] >= threshold else None


def run_dedup(cfg: DataGenConfig, log: Callable[[str], None] = print) -> dict:
    """Read dedup.input (or problems.path), dedup + decontaminate, write dedup.output and its report (returned)."""
    import datasets

    p, d = cfg.problems, cfg.dedup
    path = d.input or p.path
    rows = load_rows(path, name=p.name, split=p.split, key="dedup.input" if d.input else "problems.path")
    texts = []
    for i in range(len(rows)):
        t = check_mapping(rows, i).get(p.text_column)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{rows.where(i)}: column {p.text_column!r} is missing or empty")
        texts.append(t)
    bench = load_benchmark_items(d.benchmarks)
    kept, removed = dedup(texts, bench, ngram=d.ngram, threshold=d.threshold, decontam_threshold=d.decontam_threshold,
                          num_perm=d.num_perm, bands=d.bands)
    for r in removed:
        r["text"] = texts[r["index"]][:200]
        if "matched_index" in r:
            r["matched_text"] = texts[r["matched_index"]][:200]
    out = Path(d.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    kept_rows = [rows[i] for i in kept]
    if out.suffix == ".parquet":
        datasets.Dataset.from_list(kept_rows).to_parquet(str(out))
    elif out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept_rows))
    else:
        raise DataError(f"dedup.output: {out} must end in .jsonl or .parquet")
    by = collections.Counter(r["reason"] for r in removed)
    per_bench = collections.Counter(r["benchmark"] for r in removed if r["reason"] == "benchmark")
    report = {"input": path, "rows": len(rows), "kept": len(kept), "removed": len(removed),
              "by_reason": {k: by.get(k, 0) for k in ("exact", "near", "benchmark")},
              "by_benchmark": dict(per_bench), "benchmark_items": len(bench),
              "settings": {"ngram": d.ngram, "threshold": d.threshold, "decontam_threshold": d.decontam_threshold,
                           "num_perm": d.num_perm, "bands": d.bands, "benchmarks": list(d.benchmarks)},
              "output": str(out), "removals": removed}
    report_path = out.with_name(out.name.rsplit(".", 1)[0] + ".report.json")
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    log(f"dedup: {len(rows)} rows -> {len(kept)} kept; removed {by.get('exact', 0)} exact duplicates, "
        f"{by.get('near', 0)} near duplicates (Jaccard >= {d.threshold}), {by.get('benchmark', 0)} contaminated "
        f"({', '.join(f'{k}: {v}' for k, v in per_bench.items()) or 'none'}; {len(bench)} benchmark problems)\n"
        f"  kept rows: {out}\n  report: {report_path}")
    return report


def main(argv: list[str] | None = None) -> int:
    from qednano_jax.data.distill import cli
    return cli(argv, "dedup", __doc__, run_dedup)


if __name__ == "__main__":
    sys.exit(main())
