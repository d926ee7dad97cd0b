"""The networks and the diffusion process: X-MDPT and its parts, the frozen encoders, the training objective,
the sampler, and one loader for every file of weights."""

from .weights import export, load_checkpoint, read_checkpoint
from .diffusion import Diffusion
from .xmdpt import XMDPT, XMDPT_CONFIGS, XMDPTConfig

__all__ = ["XMDPT", "XMDPTConfig", "XMDPT_CONFIGS", "Diffusion", "load_checkpoint", "read_checkpoint", "export"]
