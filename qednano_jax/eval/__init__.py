"""Evaluation on proof benchmarks (docs/recipe.md §5): `python -m qednano_jax.eval CONFIG [key=value ...]`.

benchmarks.py (formats, loading, prompts), prompts.py (grading prompts and parsers), run.py (generate, grade,
resumable JSONL), report.py (avg@k, tables, charts).
"""
