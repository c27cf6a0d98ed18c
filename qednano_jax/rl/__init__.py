"""Stage-2/3 reinforcement learning: losses and advantages (losses.py), registered by name (docs/recipe.md §3)."""
