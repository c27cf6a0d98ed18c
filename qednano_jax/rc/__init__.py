"""Reasoning cache (SPEC.md §4): test-time RC (testtime.py); RC training state and cycles live here too."""
