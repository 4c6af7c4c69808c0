"""MONAI dictionary transforms shared by the bundles."""

from . import io
from .io import CheckPolypPaird, LoadPolypImaged, SaveMaskd
