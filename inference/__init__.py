"""Generating images: the Pipeline (weights and encoders loaded once), the test pairs, the poses of own photos."""

from .pipeline import Pipeline

__all__ = ["Pipeline"]
