"""MONAI dictionary transforms shared by the bundles."""

from . import box_prompts, cams, feature_classifier, image_labels, io, multicrop, toco_views
from .box_prompts import mask_to_box
from .feature_classifier import FeatureClassifierd
from .image_labels import ImageLevelLabeld
from .io import CheckPolypPaird, LoadPolypImaged, SaveMaskd
from .multicrop import EvalTransformd, MultiCropd
from .toco_views import ToCoViewsd
