"""Networks of the re-implemented methods (official architectures, official state-dict key names)."""

from . import polyp_pvt, pvt_v2, unetpp
from .polyp_pvt import PolypPVT
from .pvt_v2 import PyramidVisionTransformerV2, pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b3, pvt_v2_b4, pvt_v2_b5
from .unetpp import UNetPlusPlus
