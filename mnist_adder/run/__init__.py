"""The run's parts: checkpoints, progress, the dashboard, predictions."""
