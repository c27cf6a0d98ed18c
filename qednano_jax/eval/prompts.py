"""Eval prompts, written in our own words with the structure docs/recipe.md §5 describes (the judge templates are files in
qednano_jax/prompts/), and their reply parsers.

- Generation: the paper's user messages, verbatim (docs/recipe.md §5): proofs get "Generate a rigorous proof ...", AnswerBench
  asks for a boxed final answer.
- IMO-ProofBench grading: problem + reference solution + grading guidelines + proof; the grade is one of the
  IMO-ProofBench levels {0, 1, 6, 7}, reported as `<points>N out of 7</points>`.
- ProofBench grading: a strict marking-scheme grader (problem + reference solution + marking scheme + proof), any
  integer 0..7 in the same `<points>` tag.
- AnswerBench judging: is the model's final answer equivalent to the reference answer? Binary, the verdict in
  `\\boxed{Correct}` / `\\boxed{Incorrect}` (a `<verdict>` tag is accepted too).

A grade is read only from the grader's reply, never from the proof; the last tag in the reply wins, so a grader that
quotes the proof (and a fake tag inside it) before its own verdict is still read correctly.
"""

from __future__ import annotations

import re

from qednano_jax.prompts import load as load_prompt

PROOF_GENERATION = "Generate a rigorous proof to the following question:\n\n{problem}"
ANSWER_GENERATION = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."

PROOF_GRADING_FIELDS = ("problem", "solution", "guidelines", "proof")
ANSWER_JUDGING_FIELDS = ("problem", "answer", "proof")
# the judge templates: files in qednano_jax/prompts/ (swap one with eval.grading_prompt_file)
IMO_PROOFBENCH_GRADING = load_prompt("", "imo_proofbench_grading.txt", PROOF_GRADING_FIELDS, "eval.grading_prompt_file")
PROOFBENCH_GRADING = load_prompt("", "proofbench_grading.txt", PROOF_GRADING_FIELDS, "eval.grading_prompt_file")
ANSWERBENCH_JUDGING = load_prompt("", "answerbench_judging.txt", ANSWER_JUDGING_FIELDS, "eval.grading_prompt_file")

_POINTS = re.compile(r"<points>\s*(\d+)\s*out\s+of\s+7\s*</points>", re.IGNORECASE)
_VERDICT = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*(correct|incorrect)\s*\}?\s*\}|<verdict>\s*(correct|incorrect)\s*"
                      r"</verdict>", re.IGNORECASE)


def parse_points(reply: str) -> int | None:
    """The last `<points>N out of 7</points>` in a grader reply, or None when missing or out of 0..7."""
    found = _POINTS.findall(reply or "")
    if not found:
        return None
    n = int(found[-1])
    return n if 0 <= n <= 7 else None


def parse_verdict(reply: str) -> int | None:
    """1 for a final `\\boxed{Correct}` (or `<verdict>correct</verdict>`), 0 for Incorrect, None when missing."""
    found = _VERDICT.findall(reply or "")
    if not found:
        return None
    word = (found[-1][0] or found[-1][1]).lower()
    return 1 if word == "correct" else 0
