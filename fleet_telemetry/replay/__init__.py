"""Replay and backfill: sources, executors, checkpoints and progress, the run."""
