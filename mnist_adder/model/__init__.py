"""The model's parts: the net, its losses, metrics, calibration and optimizer."""
