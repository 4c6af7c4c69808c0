"""Ignite engines and inferers for methods whose training or inference step MONAI's do not cover."""

from . import co_training, inferers, multiscale_trainer, sliding_window, student_teacher, supervised_budget
from .co_training import CoTrainingTrainer
from .inferers import SummedHeadsInferer
from .multiscale_trainer import MultiScaleTrainer, rescaled_size
from .student_teacher import StudentTeacherTrainer
