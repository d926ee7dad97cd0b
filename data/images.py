"""Images as the code passes them around: float tensors (3, H, W) in [-1, 1], converted from and to uint8 RGB,
written as PNG files atomically, and laid side by side."""
import numpy as np
import torch
from PIL import Image

from data.files import atomic_path


def to_tensor(image):
    """An RGB image (PIL, or a uint8 (H, W, 3) array) as a float (3, H, W) tensor in [-1, 1] (ToTensor then
    Normalize(0.5, 0.5))."""
    return (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


def to_uint8(x):
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(x, path):
    """An image (3, H, W) in [-1, 1] as a PNG file, written atomically (data/files.py): an interrupted run never
    leaves a half-written image that a resumed run would take as done."""
    with atomic_path(path) as staged:
        Image.fromarray(to_uint8(x)).save(staged, format="PNG")


def grid_row(*images):
    """Images (3, H, W) in [-1, 1] side by side (pass skeletons, in [0, 1], as 2s - 1)."""
    return torch.cat([image.cpu() for image in images], dim=-1)
