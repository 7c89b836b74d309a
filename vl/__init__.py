"""DeepSeek-VL (hybrid SAM + SigLIP encoder) and DeepSeek-VL2 (dynamic tiling) on the shared MoE core."""

from .batch import VLBatch
from .chat import chat
from .grounding import Groundings, parse_grounding
from .image_io import ImageLoadError, load_image
from .image_processing import (
    CANDIDATE_RESOLUTIONS,
    VL2ImageProcessor,
    VLImageProcessor,
    image_token_count,
    select_best_resolution,
)
from .loading import load
from .modeling_vl import DeepseekVL, VLConfig
from .modeling_vl2 import DeepseekVL2, VL2Config
from .processing import ImageTagMismatchError, VL2ChatProcessor, VLChatProcessor

__all__ = [
    "CANDIDATE_RESOLUTIONS",
    "DeepseekVL",
    "DeepseekVL2",
    "Groundings",
    "ImageLoadError",
    "ImageTagMismatchError",
    "VL2ChatProcessor",
    "VL2Config",
    "VL2ImageProcessor",
    "VLBatch",
    "VLChatProcessor",
    "VLConfig",
    "VLImageProcessor",
    "chat",
    "image_token_count",
    "load",
    "load_image",
    "parse_grounding",
    "select_best_resolution",
]
