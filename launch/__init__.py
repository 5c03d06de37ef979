"""Thin absl launchers; run from the repo root as `python -m launch.<name>`."""
