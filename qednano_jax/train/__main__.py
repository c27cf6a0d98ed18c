"""Entry point of `python -m qednano_jax.train` (see train/cli.py)."""
import sys

from qednano_jax.train.cli import main

sys.exit(main())
