"""Ignite engines and inferers for methods whose training or inference step MONAI's do not cover."""

from .inferers import SummedHeadsInferer
from .multiscale_trainer import MultiScaleTrainer, rescaled_size
