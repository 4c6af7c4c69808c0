"""Losses of the re-implemented methods."""

from .structure import StructureLoss, boundary_weights
