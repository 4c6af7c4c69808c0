"""Losses of the re-implemented methods."""

from . import debiased_weighting, dino, structure, weighted_ce_dice
from .dino import DINOLoss
from .structure import StructureLoss, boundary_weights
