"""The reasoning cache's prompts and text helpers (shared by rc/cycle.py, rc/testtime.py and RC training).

The reasoning turn's user message is SOLVE_PROMPT(problem, summary) (+ the training-time "step by step" line); the
summarizer's is SUMMARY_PROMPT(problem, existing summary, latest thinking). Both are our own words with the structure
of the RC paper's prompts, bundled as files (qednano_jax/prompts/rc_solve.txt, rc_summary.txt).
"""

from __future__ import annotations

from typing import Any

from qednano_jax.data.tokenizer import THINK_CLOSE, THINK_OPEN
from qednano_jax.prompts import load as load_prompt

NO_SUMMARY = "[No previous summary]"
_CHAT_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

SOLVE_FIELDS = ("problem", "summary")
SUMMARY_FIELDS = ("problem", "existing_summary", "reasoning")
# the bundled templates (qednano_jax/prompts/rc_solve.txt, rc_summary.txt; swap them with rc.solve_prompt_file and
# rc.summary_prompt_file)
SOLVE_PROMPT = load_prompt("", "rc_solve.txt", SOLVE_FIELDS, "rc.solve_prompt_file")
SUMMARY_PROMPT = load_prompt("", "rc_summary.txt", SUMMARY_FIELDS, "rc.summary_prompt_file")
STEP_BY_STEP = "\n\nThink it through step by step."

def solve_prompt(problem: str, summary: str = NO_SUMMARY, step_by_step: bool = False,
                 template: str = SOLVE_PROMPT) -> str:
    """The reasoning-turn user message conditioned on the current summary."""
    return template.format(problem=problem, summary=summary) + (STEP_BY_STEP if step_by_step else "")


def summary_prompt(problem: str, existing_summary: str, reasoning: str, template: str = SUMMARY_PROMPT) -> str:
    """The summarizer's user message: problem, previous summary, latest thinking."""
    return template.format(problem=problem, existing_summary=existing_summary, reasoning=reasoning)


def strip_chat_tokens(text: str) -> str:
    """Drop ChatML control tokens (end of turn, padding) and a leading `<think>` from a decoded completion."""
    for tok in _CHAT_TOKENS:
        text = text.replace(tok, "")
    text = text.lstrip()
    return text[len(THINK_OPEN):].lstrip("\n") if text.startswith(THINK_OPEN) else text


def thinking_part(text: str) -> str:
    """The reasoning before `</think>`; the whole output when the thinking never closed (truncated)."""
    text = strip_chat_tokens(text)
    return (text.split(THINK_CLOSE, 1)[0] if THINK_CLOSE in text else text).strip()


def final_part(text: str) -> str:
    """The answer after the last `</think>`; "" when the thinking never closed (docs/recipe.md §3: no proof)."""
    text = strip_chat_tokens(text)
    return text.rsplit(THINK_CLOSE, 1)[1].strip() if THINK_CLOSE in text else ""


def summary_text(text: str) -> str:
    """A summarizer reply: its final part when it thought first, else the whole reply."""
    text = strip_chat_tokens(text)
    return final_part(text) if THINK_CLOSE in text else text.strip()


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    """Completion text with `</think>` kept (it is a special token in some tokenizers) and chat tokens removed."""
    return strip_chat_tokens(tokenizer.decode(list(token_ids), skip_special_tokens=False))
