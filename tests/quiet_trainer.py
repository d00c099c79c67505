"""Trainer arguments of tests that only need the training loop: no logger, checkpoints, progress bar or summary."""

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
