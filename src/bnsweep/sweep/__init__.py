"""Sweeps: definitions, the Optuna storage and its trial slots, the driver, workers and their launchers."""
