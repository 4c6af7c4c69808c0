"""Losses of the re-implemented methods."""

from . import (asg, crest_weighting, cxr_segmentation, debiased_pseudo_labels, debiased_weighting, dino, mil_distillation,
               simis_weighting, structure, toco, weighted_ce_dice)
from .crest_weighting import CReSTWeighting
from .debiased_pseudo_labels import DebiasedPseudoLabels
from .simis_weighting import SimiSWeighting
from .dino import DINOLoss
from .structure import StructureLoss, boundary_weights
from .toco import CTCLoss, PTCLoss, TwoClassDiceLoss
