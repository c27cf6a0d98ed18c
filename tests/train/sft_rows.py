"""Throwaway FineProofs-SFT rows for the SFT tests (the demo and overfit tests use the bundled sample file)."""
import json
import random

import pytest

WORDS = ("let n be a positive integer so that the sum of squares is even hence by induction we obtain "
         "a contradiction therefore every prime p divides the product and the claim follows").split()


def make_rows(n: int, seed: int = 0, min_words: int = 20, max_words: int = 60) -> list[dict]:
    rnd = random.Random(seed)
    text = lambda: " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(min_words, max_words)))
    return [{"problem": f"Problem {i}: prove that {text()}.", "reasoning_content": text(), "proof": text(),
             "category": "Number Theory", "competition": "Test", "gemini-3-pro-grade": 7,
             "qwen3-4b-thinking-reward@128": 0.5, "source": "olympiads",
             "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
            for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def rows_file(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", make_rows(24))
