"""Networks of the re-implemented methods (official architectures, official state-dict key names)."""

from . import (asg, asg_factory, asg_text, box_refiners, c2fnet, cascade, cdtg, center_pivot_conv4d, cxr_heads, dcrnet,
               dino_head, fcbformer, ldnet, mil, par, patnet, pidnet, polyp_pvt, prototypes, pvt_v2, res2net, shot_vote,
               text_encoders, timm_backbone, toco_vit, unetpp, vnet)
from .c2fnet import C2FNet
from .cascade import PVTCascade
from .dcrnet import DCRNet
from .fcbformer import FCBFormer
from .ldnet import LDNet
from .pidnet import PIDNet
from .cdtg import SemanticGuidedUnit, TextGuidedPrototypes
from .center_pivot_conv4d import CenterPivotConv4d
from .patnet import PATNet, patnet_resnet50
from .box_refiners import GrabCutBoxRefiner, SamBoxRefiner, ThresholdRefiner, make_box_refiner
from .dino_head import DINOHead, MultiCropWrapper
from .polyp_pvt import PolypPVT
from .pvt_v2 import PyramidVisionTransformerV2, pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b3, pvt_v2_b4, pvt_v2_b5
from .mil import EndoKEDMIL
from .par import PAR
from .timm_backbone import create_backbone
from .toco_vit import ToCoViT
from .unetpp import UNetPlusPlus
from .vnet import DualVNet, VNet
