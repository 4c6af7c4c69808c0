"""Dataset readers and generators of embedded demo data."""

from . import demo_polyps, polyp_folders
from .demo_polyps import ensure_demo_polyp_dataset, make_demo_polyp_dataset
from .polyp_folders import find_images, find_polyp_sets, polyp_datalist, require_role, resolve_roles
