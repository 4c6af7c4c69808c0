"""Ignite engines for methods whose training step MONAI's engines do not cover."""

from .multiscale_trainer import MultiScaleTrainer, rescaled_size
