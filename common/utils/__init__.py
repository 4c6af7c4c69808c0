"""Small utilities: configs, all-or-nothing output folders, figures and schedules."""

from . import checkpoints, config, distributed, figures, files, poly_warmup, ramps, schedules, warmup_cosine
