"""MONAI dictionary transforms shared by the bundles."""

from . import feature_classifier, io, multicrop
from .feature_classifier import FeatureClassifierd
from .io import CheckPolypPaird, LoadPolypImaged, SaveMaskd
from .multicrop import EvalTransformd, MultiCropd
