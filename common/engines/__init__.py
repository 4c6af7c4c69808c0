"""Ignite engines and inferers for methods whose training or inference step MONAI's do not cover."""

from . import (asg_pretraining, bag_distillation, co_training, episodic, inferers, multiscale_trainer, optimiser_step,
               pseudo_label_rounds, pseudo_masks, sliding_window, student_teacher, supervised_budget, toco_trainer)
from .episodic import EpisodicEvaluator, EpisodicTrainer
from .bag_distillation import BagDistillationTrainer, BagEvaluator
from .co_training import CoTrainingTrainer
from .inferers import SelectedHeadInferer, SummedHeadsInferer
from .multiscale_trainer import MultiScaleTrainer, rescaled_size
from .pseudo_masks import generate_pseudo_masks, read_filtered_list
from .student_teacher import StudentTeacherTrainer
from .toco_trainer import ToCoTrainer
