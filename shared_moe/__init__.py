"""The shared DeepSeek language core: MLA with a latent cache, DeepSeekMoE routers and experts, MTP, generation."""

from .cache import Cache
from .checkpoint import CheckpointMismatchError, check_tensors, read_safetensors
from .config import MoEConfig
from .model import CausalLMOutput, MoEForCausalLM
from .pretrained import from_pretrained
from .speculative import mtp_generate

__all__ = [
    "Cache",
    "CausalLMOutput",
    "CheckpointMismatchError",
    "MoEConfig",
    "MoEForCausalLM",
    "check_tensors",
    "from_pretrained",
    "mtp_generate",
    "read_safetensors",
]
