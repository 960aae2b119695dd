"""Budgeted training: budgets, the training step, the run loop, checkpoints and cost calibration."""
