"""Losses of the re-implemented methods."""

from . import asg, cxr_segmentation, debiased_weighting, dino, mil_distillation, structure, toco, weighted_ce_dice
from .dino import DINOLoss
from .structure import StructureLoss, boundary_weights
from .toco import CTCLoss, PTCLoss, TwoClassDiceLoss
