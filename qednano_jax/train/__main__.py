"""Entry point of `python -m qednano_jax.train` (see train/cli.py)."""
import sys

from qednano_jax import hostmem

hostmem.use_huge_pages()  # re-executes once with glibc's huge-page tunable: each step's scratch buffer (hostmem.py)

from qednano_jax.train.cli import main  # noqa: E402 - after the re-execution

sys.exit(main())
