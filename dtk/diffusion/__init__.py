"""Diffusion models: loading, schedules, conditioning and samplers."""
