"""The project's prompt templates, in our own words, bundled as text files in this folder, and the one loader that
every prompt field of the configs goes through (`grader.prompt_file`, `rubrics.prompt_file`,
`eval.grading_prompt_file`, `rc.solve_prompt_file`, `rc.summary_prompt_file`).

    grader.txt                 the RL reward's rubric grader        {problem} {marking_scheme} {solution}
    marking_scheme.txt         the marking-scheme writer            {problem} {solution}
    imo_proofbench_grading.txt IMO-ProofBench judge (0/1/6/7)       {problem} {solution} {guidelines} {proof}
    proofbench_grading.txt     ProofBench judge (0..7)              {problem} {solution} {guidelines} {proof}
    answerbench_judging.txt    IMO-AnswerBench answer checker       {problem} {answer} {proof}
    rc_solve.txt               reasoning-cache reasoning turn       {problem} {summary}
    rc_summary.txt             reasoning-cache summarizer           {problem} {existing_summary} {reasoning}

Templates use Python `str.format` fields; literal braces are doubled (`{{` `}}`). A file is used byte for byte (its
last newline included), so a released prompt file plugs in as it is (README "Reproducing with the released prompts").
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

from qednano_jax.config import ConfigError

BUNDLED = Path(__file__).resolve().parent


def fields_of(text: str) -> set[str]:
    """The `str.format` field names a template uses (ValueError for a malformed template)."""
    return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def load(path: str | Path, default: str, fields: Iterable[str], key: str) -> str:
    """The template in `path` ('' = the bundled file `default`), which must use exactly `fields`. A file that cannot
    be read, is malformed, lacks a field or uses another one is a ConfigError naming `key`, the file and the field."""
    p = Path(path) if str(path) else BUNDLED / default
    want = set(fields)
    expected = " ".join("{" + f + "}" for f in sorted(want))
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {p}: {e.strerror or e}") from None
    try:
        names = fields_of(text)
    except ValueError as e:
        raise ConfigError(f"{key}: {p} is not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    if want - names:
        missing = " ".join("{" + f + "}" for f in sorted(want - names))
        raise ConfigError(f"{key}: {p} lacks the template variable(s) {missing} (it must use {expected})")
    if names - want:
        extra = " ".join("{" + f + "}" for f in sorted(names - want))
        raise ConfigError(f"{key}: {p} uses unknown template variable(s) {extra} (it may use only {expected}; write "
                          "literal braces as {{ and }})")
    return text
