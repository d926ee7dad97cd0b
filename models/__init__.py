from .checkpoint import load_checkpoint, save_safetensors
from .diffusion import Diffusion
from .xmdpt import XMDPT, XMDPT_CONFIGS

__all__ = ["XMDPT", "XMDPT_CONFIGS", "Diffusion", "load_checkpoint", "save_safetensors"]
