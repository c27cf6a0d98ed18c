"""`python -m qednano_jax.eval CONFIG [key=value ...]`: generate proofs for a benchmark, grade them as the paper does,
and write out_dir/results.jsonl (resumable: re-run the same command to continue), summary.md, summary.json and
scores.png (docs/recipe.md §5). `--help` lists every config field; `python -m qednano_jax.eval.report` compares result
files of several runs or checkpoints in one table and chart.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    from qednano_jax.config import EvalRunConfig, describe, load_eval_config

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("\n".join(describe(EvalRunConfig)))
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    cfg = load_eval_config(path, argv)
    from qednano_jax.eval.run import run_eval
    print(f"out dir: {cfg.eval.out_dir}", flush=True)
    run_eval(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
