"""Ignite handlers: training-state checkpoints and evaluation reports."""

from . import polyp_report, training_state
from .polyp_report import PolypEvaluationReport
from .training_state import TrainingStateCheckpoint, latest_training_state
