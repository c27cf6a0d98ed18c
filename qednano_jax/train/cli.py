"""`python -m qednano_jax.train [CONFIG] [key=value ...]` (DESIGN.md principle 6).

The stage (sft | rl | rc) comes from the config file. With no arguments: the tiny SFT demo on CPU with the embedded
defaults (`Config()`), reading the bundled sample data. `--help` lists every config field.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from qednano_jax.config import Config, ConfigError, describe, load_config

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("\n".join(describe(Config)))
        return 0
    path = argv.pop(0) if argv and "=" not in argv[0] else None

    from qednano_jax import sharding
    sharding.maybe_initialize_distributed()  # before anything touches the devices
    try:
        cfg = load_config(path, argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from qednano_jax.reward.grader import GraderError
    from qednano_jax.train.driver import NonFinite
    try:
        if cfg.stage == "sft":
            from qednano_jax.train import sft
            sft.run(cfg)
        elif cfg.stage == "rc":
            from qednano_jax.rc import train as rc_train  # SPEC.md §4, on the RL loop's trainer and pipeline
            rc_train.run(cfg)
        else:
            from qednano_jax.rl import loop  # stage 2: RL with rubric rewards (SPEC.md §3)
            loop.run(cfg)
    except ConfigError as e:  # found once the run starts (a held run-dir lock, a changed config on resume, ...)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (NonFinite, GraderError) as e:  # the run stopped on purpose; the last checkpoint is intact
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0  # finished, or preempted (SIGTERM / SIGINT) with a checkpoint to resume from
