"""Measurement: rewards that score images, and the metrics that benchmark models."""
