"""FrugalZoo's shared library: networks, losses, metrics, transforms, data readers, engines and handlers.

Every bundle under ``bundles/`` builds its workflow from these pieces through its JSON configs, where
``"$import common"`` makes every sub-package below reachable in expressions (``$common.data.polyp_folders...``).
"""

from . import data, engines, handlers, losses, metrics, networks, transforms, utils

__version__ = "0.1.0"
