"""`python -m qednano_jax.train [CONFIG] [key=value ...]` (docs/design.md principle 7).

The stage (sft | rl | rc) comes from the config file. With no arguments: the tiny SFT demo on CPU with the embedded
defaults (`Config()`), reading the bundled sample data. `--help` lists every config field.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    from qednano_jax.config import Config, describe, load_config

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("\n".join(describe(Config)))
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None

    from qednano_jax import sharding
    sharding.maybe_initialize_distributed()  # before anything touches the devices
    cfg = load_config(path, argv)
    print(f"run dir: {cfg.train.run_dir} (stage {cfg.stage})", flush=True)
    if cfg.stage == "sft":
        from qednano_jax.train import sft
        sft.run(cfg)
    elif cfg.stage == "rc":
        from qednano_jax.rc import train as rc_train  # docs/recipe.md §4, on the RL loop's trainer and pipeline
        rc_train.run(cfg)
    else:
        from qednano_jax.rl import loop  # stage 2: RL with rubric rewards (docs/recipe.md §3)
        loop.run(cfg)
    return 0  # finished, or preempted (SIGTERM / SIGINT) with a checkpoint to resume from
