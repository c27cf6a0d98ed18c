"""Reasoning cache (docs/recipe.md §4): the RC state pytree and its transition (state.py), RC turns on token arrays as a
jitted native loop or a host loop (cycle.py), RC training on the stage-2 trainer (train.py), test-time RC
(testtime.py)."""
