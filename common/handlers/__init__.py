"""Ignite handlers: training-state checkpoints and evaluation reports."""

from . import (checkpoint_saver, class_probability_writer, epoch_seed, fewshot_report, label_budget_report,
               embedding_writer, organ_report, polyp_report, results_table, training_state, wsss_report,
               zero_shot_report)
from .fewshot_report import FewShotSweep
from .class_probability_writer import ClassProbabilityWriter
from .label_budget_report import LabelBudgetReport
from .organ_report import OrganEvaluationReport
from .polyp_report import PolypEvaluationReport
from .training_state import TrainingStateCheckpoint, latest_training_state
