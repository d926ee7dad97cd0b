"""The DeepFashion metrics (FID, SSIM, PSNR, LPIPS) under two protocols, and two distribution metrics for
comparing samplers: the sliced Wasserstein distance on Laplacian-pyramid patches (no network) and KID.

pidm (the default): the PIDM/GFLA metrics script behind the published tables. Every choice (sizes,
interpolation, SSIM arguments, value ranges) follows it, so that the numbers are comparable with them.
cfld: the computation of CFLD's evaluation code, which resizes every image with PIL bicubic and reports two SSIMs.

Pure functions and the two frozen networks; file handling and the command line live in `eval/fid_ssim_lpips.py`.
"""
import hashlib
import warnings

import cv2
import lpips
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy import linalg
from scipy.ndimage import convolve
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision IMAGENET1K_V1
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision IMAGENET1K_V1, the LPIPS trunk

# torchvision's `transform_input` of the ImageNet Inception, kept by the legacy FID script:
# x * std / 0.5 + (mean - 0.5) / 0.5 per channel, applied to [0, 1] inputs.
INCEPTION_SCALE = (0.458, 0.448, 0.450)
INCEPTION_SHIFT = (-0.030, -0.088, -0.188)


def eval_width(size):
    """Width of the benchmark's person images: 176 for 256, 352 for 512."""
    return size * 11 // 16


def resized(rgb, size, protocol="pidm"):
    """uint8 RGB (H, W, 3) -> float32 (size, eval_width(size), 3) on 0..255, resized as `protocol` does:
    cv2 bilinear on the float image (pidm), or PIL bicubic, antialiased, on the uint8 image (cfld)."""
    if protocol == "cfld":
        return np.asarray(Image.fromarray(rgb).resize((eval_width(size), size), Image.BICUBIC), np.float32)
    return cv2.resize(rgb.astype(np.float32), (eval_width(size), size), interpolation=cv2.INTER_LINEAR)


def fid_input(rgb, size=256, protocol="pidm"):
    """uint8 RGB (H, W, 3) -> float32 tensor (3, size, eval_width(size)) in [0, 1]."""
    return torch.from_numpy(resized(rgb, size, protocol) / 255).permute(2, 0, 1)


def lpips_input(rgb, size=256, protocol="pidm"):
    """uint8 RGB (H, W, 3) -> float32 tensor (3, size, eval_width(size)) in [-1, 1]."""
    return torch.from_numpy(resized(rgb, size, protocol) / 127.5 - 1).permute(2, 0, 1)


def ssim(gt, gen, sigma=1.2):
    """Gaussian-window SSIM of two same-size RGB images on 0..255, with the legacy arguments (population
    covariance, data range of `gen`). skimage computes uint8 images in float64 and float32 ones in float32."""
    if gt.shape != gen.shape:
        raise ValueError(f"SSIM needs images of the same size, got {gt.shape} and {gen.shape}")
    return float(structural_similarity(gt, gen, gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                       channel_axis=-1, data_range=gen.max() - gen.min()))


def psnr(gt, gen, peak=255):
    """PSNR of two RGB images divided by `peak` (255: uint8 images, as float64; 1: [0, 1] images as they are),
    with data_range 1; inf for identical images."""
    with np.errstate(divide="ignore"):
        return float(peak_signal_noise_ratio(gt / peak, gen / peak, data_range=1))


# What each protocol reports as SSIM, by result key.
SSIM_DEFINITIONS = {
    "pidm": {"ssim": "Gaussian window (sigma 1.2) on 0..255, data range of the generated image, full size"},
    "cfld": {"ssim": "uniform 51x51 window on [0, 1], data range 1, resized",
             "ssim_256": "Gaussian window (sigma 1.5) on 0..255, data range of the generated image, resized"},
}


def paired_scores(gt, gen, size=256, protocol="pidm"):
    """The SSIM(s) (keys of SSIM_DEFINITIONS[protocol]) and PSNR of a (ground truth, generated) uint8 RGB pair.

    pidm compares the images at full size (they must match); cfld resizes both and compares them as float32
    [0, 1] arrays, the values and precision of CFLD's tensors.
    """
    if protocol == "pidm":
        return {"ssim": ssim(gt, gen), "psnr": psnr(gt, gen)}
    gt, gen = resized(gt, size, protocol) / 255, resized(gen, size, protocol) / 255
    return {"ssim": float(structural_similarity(gt, gen, data_range=1, win_size=51, channel_axis=-1)),
            "ssim_256": ssim(gt * 255, gen * 255, sigma=1.5), "psnr": psnr(gt, gen, peak=1)}


def feature_statistics(features):
    """Mean and (unbiased) covariance of an (N, D) feature array, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrtm(S1 S2)), with the legacy safeguards."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        print(f"FID: singular covariance product, adding {eps} to the diagonals")
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def build_inception(weights_path=None, random_weights=False):
    """torchvision Inception-v3 returning the 2048-d pool features after Mixed_7c.

    Loads `weights_path` (the IMAGENET1K_V1 file) strictly; `random_weights=True` instead keeps the random
    initialisation, for tests only.
    """
    if (weights_path is None) == (not random_weights):
        raise ValueError("give either weights_path or random_weights=True")
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    if weights_path is not None:
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    net.fc = nn.Identity()  # eval mode: avgpool -> dropout (off) -> flatten -> fc
    return net.eval()


class InceptionFeatures(nn.Module):
    """The legacy FID network input: [0, 1] images -> bilinear 299x299 -> affine -> `net` -> (N, D)."""

    def __init__(self, net):
        super().__init__()
        self.net = net.eval()
        self.register_buffer("scale", torch.tensor(INCEPTION_SCALE).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor(INCEPTION_SHIFT).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x * self.scale + self.shift).flatten(1)


def build_lpips(trunk_path=None, random_trunk=False):
    """LPIPS v0.1 with the AlexNet trunk loaded from `trunk_path` (the IMAGENET1K_V1 file), never downloaded.

    The linear heads ship inside the lpips package. `random_trunk=True` keeps a random trunk, for tests only.
    """
    if (trunk_path is None) == (not random_trunk):
        raise ValueError("give either trunk_path or random_trunk=True")
    with warnings.catch_warnings():  # lpips builds its trunk with torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    if trunk_path is not None:
        state = torch.load(trunk_path, map_location="cpu", weights_only=True)
        features = torchvision.models.alexnet(weights=None).features  # the trunk; the classifier is unused
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
        for block in model.net.children():  # slice1..slice5 keep torchvision's layer indices as names
            for index, layer in block.named_children():
                layer.load_state_dict(features[int(index)].state_dict())
    return model.eval()


@torch.no_grad()
def lpips_distance(model, gt, gen):
    """Per-pair LPIPS (N,) of two [-1, 1] image batches (N, 3, H, W)."""
    return model(gt, gen).flatten()


def network_fingerprint(net):
    """sha1 of a network's state dict, so that cached statistics are tied to the weights that made them."""
    digest = hashlib.sha1()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- distribution metrics

GAUSS_5 = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256  # the pyramid's 5x5 binomial kernel


def pyramid_down(images):
    """(N, H, W, C) float images blurred by GAUSS_5 (edges mirrored) and every other row and column kept."""
    return convolve(images, GAUSS_5[None, :, :, None], mode="mirror")[:, ::2, ::2]


def pyramid_up(images):
    """The inverse step's expansion: zeros between the pixels, then GAUSS_5 times 4 (the zeros' share)."""
    n, h, w, c = images.shape
    spread = np.zeros((n, 2 * h, 2 * w, c), images.dtype)
    spread[:, ::2, ::2] = images
    return convolve(spread, 4 * GAUSS_5[None, :, :, None], mode="mirror")


def laplacian_pyramid(images, min_size=16):
    """The Laplacian pyramid of (N, H, W, C) float images down to `min_size`: the band-pass levels, finest
    first, then the low-pass residual at min_size; the levels sum back (`pyramid_up` each coarser) to the images."""
    levels, current = [], np.asarray(images, np.float64)
    while current.shape[1] > min_size:
        coarser = pyramid_down(current)
        levels.append(current - pyramid_up(coarser))
        current = coarser
    return levels + [current]


def patch_descriptors(level, per_image=128, size=7, rng=None):
    """`per_image` random size x size patches of each image of a pyramid level (N, H, W, C), each channel
    normalised to mean 0 and standard deviation 1 over all the patches: (N * per_image, size * size * C)."""
    rng = rng or np.random.default_rng(0)
    n, h, w, c = level.shape
    ys = rng.integers(0, h - size + 1, (n, per_image))
    xs = rng.integers(0, w - size + 1, (n, per_image))
    offsets = np.arange(size)
    patches = level[np.arange(n)[:, None, None, None], (ys[..., None] + offsets)[..., None],
                    (xs[..., None] + offsets)[..., None, :]]  # (N, per_image, size, size, C)
    patches = patches.reshape(-1, size, size, c)
    patches = (patches - patches.mean(axis=(0, 1, 2))) / patches.std(axis=(0, 1, 2))
    return patches.reshape(len(patches), -1)


def sliced_wasserstein(a, b, projections=512, rng=None):
    """The sliced Wasserstein distance of two equal-size point sets (M, D): the mean, over random unit directions,
    of the 1-D Wasserstein-1 distance of their projections (for equal sizes, the mean gap of the sorted values)."""
    rng = rng or np.random.default_rng(0)
    directions = rng.standard_normal((a.shape[1], projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    projected = [np.sort(directions.T @ points.T, axis=1) for points in (a, b)]  # (projections, M), rows sorted
    return float(np.abs(projected[0] - projected[1]).mean())


def swd(real, fake, min_size=16, per_image=128, projections=512, seed=0):
    """Sliced Wasserstein distance between two sets of uint8 RGB images (N, H, W, 3), as ProGAN measures it
    (Karras et al. 2018, section 5): per level of a Laplacian pyramid down to 16x16, 7x7 patches with each
    channel normalised, compared along 512 random directions; in thousandths, by level size, with their mean
    ("mean"). Blur and grain both move the patches' distribution away from the real one's."""
    if len(real) != len(fake):
        raise ValueError(f"SWD compares sets of the same size, got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    pyramids = [laplacian_pyramid(np.asarray(images, np.float64) / 255, min_size) for images in (real, fake)]
    scores = {}
    for real_level, fake_level in zip(*pyramids):
        a, b = (patch_descriptors(level, per_image, rng=rng) for level in (real_level, fake_level))
        scores[real_level.shape[1]] = 1e3 * sliced_wasserstein(a, b, projections, rng)
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def kid(real_features, fake_features, subset_size=1000, subsets=100, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018) of two sets of Inception features (N, D): the unbiased
    MMD^2 with the cubic polynomial kernel (x.y / D + 1)^3, averaged over `subsets` random subsets of
    min(subset_size, N) each; unbiased at any sample size, unlike FID. -> (mean, standard deviation), computed by
    torchmetrics on the features given."""
    from torchmetrics.image.kid import KernelInceptionDistance
    size = min(subset_size, len(real_features), len(fake_features))
    with warnings.catch_warnings():  # that it keeps every feature in memory: these are the features
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=nn.Identity(), subsets=subsets, subset_size=size)
    metric.update(torch.as_tensor(real_features, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake_features, dtype=torch.float64), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
