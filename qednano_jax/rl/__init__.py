"""Stage-2/3 reinforcement learning: losses and advantages (losses.py), registered by name (SPEC.md §3)."""
