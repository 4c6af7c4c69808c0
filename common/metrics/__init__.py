"""Evaluation measures with the exact conventions of each method's protocol."""

from . import cxr, fewshot, label_budget_sweep, organ_overlap, polyp, probe, saliency
from .fewshot import FewShotIoU, FewShotIoUMetric
from .polyp import PolypDiceMetric, hd95, polyp_measures, prepare_probability
from .saliency import mae, mean_e_measure, s_measure, saliency_measures, weighted_f_measure
