"""Rubric rewards (docs/recipe.md §3 "Reward"): the grading prompt (qednano_jax/prompts/grader.txt, our own words), proof
extraction, score parsing and the grader backends (grader.py)."""
