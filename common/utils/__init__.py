"""Small utilities: configs, all-or-nothing output folders, figures and schedules."""

from . import checkpoints, config, figures, files, ramps, schedules
