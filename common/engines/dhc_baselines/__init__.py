"""The DHC paper's remaining semi-supervised baselines (specs/dhc.md §9), one module per method.

Each module holds the method's :class:`~common.engines.co_training.CoTrainingMethod` (the glue that turns the
branches' outputs into one loss); the method's distinctive part (loss, weighting, pseudo-label rule, extra head)
lives in ``common/losses/`` or ``common/networks/``. The registry is :mod:`common.engines.co_training_methods`.
"""
