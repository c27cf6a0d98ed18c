"""`python -m qednano_jax.eval CONFIG [key=value ...]`: generate proofs for a benchmark, grade them as the paper does,
and write out_dir/results.jsonl (resumable: re-run the same command to continue), summary.md, summary.json and
scores.png (SPEC.md §5). `--help` lists every config field; `python -m qednano_jax.eval.report` compares result
files of several runs or checkpoints in one table and chart.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from qednano_jax.config import ConfigError, EvalRunConfig, describe, load_eval_config

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("\n".join(describe(EvalRunConfig)))
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None
    try:
        cfg = load_eval_config(path, argv)
        from qednano_jax.eval.benchmarks import BenchmarkError
        from qednano_jax.eval.run import run_eval
        run_eval(cfg)
    except (ConfigError, BenchmarkError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
