"""Pieces of training recipes that scripts and benchmarks share (distillation from a float teacher)."""

from bitcompile.training.distill import distillation_loss

__all__ = ["distillation_loss"]
