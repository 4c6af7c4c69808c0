"""MONAI dictionary transforms shared by the bundles."""

from . import (box_prompts, cams, cxr, cxr_pipelines, cxr_text, feature_classifier, fewshot, image_labels, io, multicrop,
               toco_views)
from .fewshot import FewShotPairLoader
from .box_prompts import mask_to_box
from .feature_classifier import FeatureClassifierd
from .image_labels import ImageLevelLabeld
from .io import CheckPolypPaird, LoadPolypImaged, SaveMaskd
from .multicrop import EvalTransformd, MultiCropd
from .toco_views import ToCoViewsd
