"""Dataset readers and generators of embedded demo data."""

from . import (classification_folders, demo_classification, demo_polyps, demo_volumes, generated, label_budget,
               polyp_folders, volume_folders)
from .demo_classification import ensure_demo_classification_dataset, make_demo_classification_dataset
from .demo_polyps import ensure_demo_polyp_dataset, make_demo_polyp_dataset
from .demo_volumes import ensure_demo_volume_dataset, make_demo_volume_dataset
from .polyp_folders import find_images, find_polyp_sets, polyp_datalist, require_role, resolve_roles
