"""Download the paper's datasets from the Hugging Face hub into local files (docs/recipe.md §2, §3, §5).

Training and eval machines here have no hub access, so run this once on a machine that has it, copy the folder
over, and point `data.path` (SFT/RL) or `eval.source` (benchmarks) at the files:

    python -m qednano_jax.data.fetch --out data/hub                         # all six datasets
    python -m qednano_jax.data.fetch --out data/hub --only FineProofs-SFT   # one of them (repeatable)

Layout: OUT/<dataset>/<config>/<split>.<format> for FineProofs-SFT (configs `default` = one sample per unique
problem, `all`), OUT/<dataset>/<split>.<format> for the others. Each split is one file, so a file or a
config folder can be given to the loaders directly (a dataset folder would merge its configs).
"""

from __future__ import annotations

import sys
from pathlib import Path

# hub id -> configs to fetch (None = the dataset's only config); docs/recipe.md §2 (SFT), §3 (RL), §5 (benchmarks)
DATASETS: dict[str, tuple[str | None, ...]] = {
    "lm-provers/FineProofs-SFT": ("default", "all"),
    "lm-provers/FineProofs-RL": (None,),
    "lm-provers/FineProofs-RL-test": (None,),
    "lm-provers/IMOProofBench": (None,),
    "lm-provers/ProofBench": (None,),
    "lm-provers/IMOBench-FinalAnswer": (None,),
}
# row counts stated on the dataset cards (docs/recipe.md §2, §3), printed next to what was downloaded
CARD_ROWS = {("lm-provers/FineProofs-SFT", "default", "train"): 4281,
             ("lm-provers/FineProofs-SFT", "all", "train"): 7777,
             ("lm-provers/FineProofs-RL", None, "train"): 5227}


def _check_hub(endpoint: str) -> None:
    """Fail early, and say what to do, when the hub cannot be reached (the usual case on our machines)."""
    import requests

    try:
        requests.head(endpoint, timeout=10)
    except requests.RequestException as e:
        raise SystemExit(f"fetch: cannot reach the Hugging Face hub at {endpoint} ({type(e).__name__}). This machine "
                         "has no hub access: run `python -m qednano_jax.data.fetch --out DIR` on a machine that has "
                         "it, copy DIR here, and point data.path / eval.source at the files.") from None


def fetch(repo: str, config: str | None, out: Path, fmt: str) -> dict[str, int]:
    """Save every split of `repo`/`config` under `out`; returns {path: rows}."""
    import datasets

    try:
        dsd = datasets.load_dataset(repo, config)
    except Exception as e:  # noqa: BLE001 - re-raised naming the dataset (gated, renamed, network dropped)
        raise SystemExit(f"fetch: could not download {repo} (config {config or 'default'}): {e}") from e
    folder = out / repo.split("/")[1] / (config or "")
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, ds in dsd.items():
        path = folder / f"{split}.{fmt}"
        if fmt == "parquet":
            ds.to_parquet(str(path))
        else:
            ds.to_json(str(path), lines=True, force_ascii=False)
        card = CARD_ROWS.get((repo, config, split))
        print(f"{repo:34s} {config or '-':8s} {split:10s} {ds.num_rows:6d} rows"
              + (f" (card: {card})" if card is not None else "") + f" -> {path}")
        written[str(path)] = ds.num_rows
    return written


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from huggingface_hub import constants

    from qednano_jax import cli
    p = cli.ArgumentParser(prog="python -m qednano_jax.data.fetch", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/hub"), help="folder to write into (default: data/hub)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="fetch only this dataset (e.g. FineProofs-SFT or lm-provers/IMOProofBench); repeatable")
    p.add_argument("--format", choices=("parquet", "jsonl"), default="parquet", help="file format of each split")
    args = p.parse_args(argv)

    repos = list(DATASETS)
    if args.only:
        wanted = {n.lower().split("/")[-1] for n in args.only}
        unknown = wanted - {r.split("/")[1].lower() for r in repos}
        if unknown:
            p.error(f"--only: unknown dataset(s) {sorted(unknown)}; choose from {[r.split('/')[1] for r in repos]}")
        repos = [r for r in repos if r.split("/")[1].lower() in wanted]
    if constants.HF_HUB_OFFLINE:
        raise SystemExit("fetch: HF_HUB_OFFLINE is set; unset it on a machine with hub access and run again.")
    _check_hub(constants.ENDPOINT)
    total = sum(sum(fetch(r, c, args.out, args.format).values()) for r in repos for c in DATASETS[r])
    print(f"done: {total} rows under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
