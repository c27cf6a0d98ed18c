"""What every command line of the project does around its work (`python -m qednano_jax.train`, `.eval`,
`.eval.report`, `.plan`, `.serve`, `.data.distill`, `.data.rubrics`, `.data.dedup`, `.data.fetch`):

- third-party noise is silenced before anything imports it (transformers' "PyTorch was not found", datasets'
  progress bars): an explicit environment setting still wins;
- a user mistake (`config.UserError`: a config key or value, a data file, a checkpoint or run dir, a prompt file)
  is ONE line on stderr naming the culprit, and exit code 2; commands validate their inputs before writing;
- a run that stopped on purpose (`config.RunStopped`: a non-finite step, a grader failing most calls, rollout
  servers that never came up) is one line and exit code 1; its last checkpoint is intact;
- anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


def quiet() -> None:
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)


def run(main: Callable[[], int | None]) -> int:
    """main() -> exit code, with the error policy of the module doc."""
    quiet()
    from qednano_jax.config import RunStopped, UserError
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the same policy: a bad flag or value is one line naming it (`--help` shows the usage), exit 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)
