"""Small utilities: all-or-nothing output folders and figures."""

from . import config, figures, files
