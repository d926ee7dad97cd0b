"""FID, SSIM, PSNR and LPIPS of generated DeepFashion images, with the PIDM/GFLA protocol (or CFLD's).

    python eval/fid_ssim_lpips.py --generated out/ --target test_256/ --real-train datasets/deepfashion \
        --stats-cache ~/.cache/xmdpt --json metrics.json

The metric definitions are in eval/metrics.py and the image files in eval/images.py; this file runs the
passes and reports. eval/ needs nothing else of this repository: copy the folder next to any method's outputs
and run this file by its path, from any folder.
"""
import argparse
import hashlib
import json
import os
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

if __package__:  # imported (eval.fid_ssim_lpips), or run as python -m eval.fid_ssim_lpips
    from .images import ImageFiles, pair_files, read_rgb, real_images
    from .metrics import (ALEXNET_FILE, INCEPTION_FILE, SSIM_DEFINITIONS, InceptionFeatures, build_inception,
                          build_lpips, feature_statistics, fid_input, frechet_distance, lpips_distance, lpips_input,
                          network_fingerprint, paired_scores)
else:  # run by its path, python eval/fid_ssim_lpips.py: this folder is the first on the module path
    from images import ImageFiles, pair_files, read_rgb, real_images
    from metrics import (ALEXNET_FILE, INCEPTION_FILE, SSIM_DEFINITIONS, InceptionFeatures, build_inception,
                         build_lpips, feature_statistics, fid_input, frechet_distance, lpips_distance, lpips_input,
                         network_fingerprint, paired_scores)

STATS_VERSION = "fid-v2"  # bump when the FID pipeline or the cache key changes, so old caches are not reused
PROTOCOL_NAMES = {"pidm": "PIDM/GFLA", "cfld": "CFLD"}


# ----------------------------------------------------------------------------- passes

def used_count(n, batch_size, keep_last):
    """Images used by a batched pass: the legacy scripts drop the incomplete last batch (all of a set smaller
    than one batch is used)."""
    return n if keep_last or n < batch_size else n - n % batch_size


def extract_features(dataset, extractor, count, args, desc):
    """(count, D) float64 features of the first `count` images of `dataset`."""
    subset = Subset(dataset, range(count)) if count < len(dataset) else dataset
    loader = DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers)
    features = [extractor(batch.to(args.device)).double().cpu().numpy() for batch in tqdm(loader, desc=desc)]
    return np.concatenate(features)


def real_statistics(dataset, extractor, args):
    """(mu, sigma, count) of the real set, cached under --stats-cache keyed by the set, network and settings."""
    count = used_count(len(dataset), args.batch_size, args.keep_last_batch)
    if not args.stats_cache:
        return *feature_statistics(extract_features(dataset, extractor, count, args, "FID real")), count
    key = hashlib.sha1(json.dumps({
        "version": STATS_VERSION, "images": dataset.fingerprint(), "network": network_fingerprint(extractor),
        "size": args.size, "protocol": args.protocol, "count": count}, sort_keys=True).encode()).hexdigest()
    cache = Path(args.stats_cache) / f"fid_real_{key[:16]}.npz"
    cached = load_statistics(cache, key)
    if cached is not None:
        print(f"FID real statistics: loaded from {cache}")
        return *cached, count
    mu, sigma = feature_statistics(extract_features(dataset, extractor, count, args, "FID real"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    staged = cache.with_name(f".{cache.name}.partial")  # renamed into place when complete
    with open(staged, "wb") as f:
        np.savez(f, key=key, mu=mu, sigma=sigma)
    os.replace(staged, cache)
    print(f"FID real statistics: saved to {cache}")
    return mu, sigma, count


def load_statistics(cache, key):
    """(mu, sigma) from a cache file when it exists, was written for `key`, and holds sane arrays."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache) as data:
            stored_key, mu, sigma = str(data["key"]), data["mu"], data["sigma"]
    except (OSError, ValueError, KeyError) as error:
        print(f"FID real statistics: ignoring unreadable cache {cache} ({error})")
        return None
    dim = mu.shape[0] if mu.ndim == 1 else -1
    if stored_key != key or sigma.shape != (dim, dim) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        print(f"FID real statistics: ignoring cache {cache} (key or contents do not match)")
        return None
    return mu, sigma


class PairedImages(Dataset):
    """The SSIM(s) and PSNR of each pair, computed in the loader workers, plus the two LPIPS inputs."""

    def __init__(self, pairs, size, protocol):
        self.pairs, self.size, self.protocol = pairs, size, protocol

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        gt, gen = (read_rgb(path) for path in self.pairs[i])
        if self.protocol == "pidm" and gt.shape != gen.shape:
            raise ValueError(f"{self.pairs[i][1]} is {gen.shape[:2]} but its ground truth is {gt.shape[:2]}")
        return (paired_scores(gt, gen, self.size, self.protocol),
                lpips_input(gt, self.size, self.protocol), lpips_input(gen, self.size, self.protocol))


def paired_metrics(pairs, lpips_model, args):
    """Mean SSIM(s) and PSNR over all pairs; mean LPIPS over the pairs of the complete batches."""
    lpips_count = used_count(len(pairs), args.batch_size, args.keep_last_batch)
    loader = DataLoader(PairedImages(pairs, args.size, args.protocol), batch_size=args.batch_size,
                        num_workers=args.workers)
    scores, distances, seen = defaultdict(list), [], 0
    for batch_scores, gt, gen in tqdm(loader, desc="SSIM/PSNR/LPIPS"):
        if lpips_model is not None and seen + len(gt) <= lpips_count:
            distances.append(lpips_distance(lpips_model, gt.to(args.device), gen.to(args.device)).cpu())
        seen += len(gt)
        for key, values in batch_scores.items():
            scores[key] += values.tolist()
    result = {key: float(np.mean(values)) for key, values in scores.items()}
    if lpips_model is not None:
        result.update(lpips=torch.cat(distances).mean().item(), lpips_pairs=lpips_count)
    return result


# ----------------------------------------------------------------------------- command line

def find_weights(flag, filename, option):
    """(path, None) from `option` or $TORCH_HOME/hub/checkpoints, else (None, why not)."""
    if flag:
        if not Path(flag).is_file():
            raise FileNotFoundError(f"{option} {flag}: no such file")
        return Path(flag), None
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if path.is_file():
        return path, None
    return None, f"needs {filename} (pass {option} FILE or put it in {path.parent})"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="FID, SSIM, PSNR and LPIPS of generated DeepFashion images. By default this is the "
                    "PIDM/GFLA protocol behind the published pose-guided synthesis numbers (PIDM, X-MDPT, ...): "
                    "FID of the generated test images against all training images with torchvision's ImageNet "
                    "Inception-v3 pool features (images resized with cv2 to 176x256, or 352x512, then bilinearly "
                    "to 299); paired skimage SSIM (Gaussian, sigma 1.2) and PSNR at full size; paired LPIPS "
                    "(alex, v0.1) at 176x256; FID and LPIPS in batches of 64 whose incomplete last batch is "
                    "dropped. --protocol cfld computes the metrics as CFLD's code does instead. Without the "
                    "Inception or AlexNet weights, SSIM and PSNR are still reported and the missing metric is "
                    "named with the file it needs; no weights are ever downloaded.")
    parser.add_argument("--generated", type=Path, required=True, metavar="DIR",
                        help="folder of generated images (.png/.jpg), one per test pair")
    parser.add_argument("--target", type=Path, required=True, metavar="DIR",
                        help="folder of ground-truth images: either the same file names as --generated, or the "
                             "target parts of legacy names `{source}_2_{target}_vis.png` (as `{target}.png`)")
    parser.add_argument("--naming", choices=("auto", "same", "legacy"), default="auto",
                        help="how generated names map to ground truth (default auto: identical names when all "
                             "exist in --target, else the legacy rule)")
    parser.add_argument("--real-train", type=Path, metavar="PATH",
                        help="FID real set: a folder of images, or a DeepFashion LMDB folder `{root}/256-256` "
                             "(or `{root}` itself) read for the images of `{root}/train.lst` (image paths or flat "
                             "names; stored under the image path with a .png extension, PNG bytes); "
                             "without it FID is not computed. The published 'Ground Truth' FID is this script with "
                             "--generated set to the --target folder")
    parser.add_argument("--inception-weights", metavar="FILE",
                        help=f"torchvision Inception-v3 IMAGENET1K_V1 state dict ({INCEPTION_FILE}); default: "
                             "$TORCH_HOME/hub/checkpoints. Never downloaded")
    parser.add_argument("--lpips-weights", metavar="FILE",
                        help=f"torchvision AlexNet IMAGENET1K_V1 state dict ({ALEXNET_FILE}), the LPIPS trunk "
                             "(the linear heads come with the lpips package); default: $TORCH_HOME/hub/checkpoints")
    parser.add_argument("--size", type=int, choices=(256, 512), default=256,
                        help="benchmark resolution: images are resized to 176x256 or 352x512 (W x H) for FID and "
                             "LPIPS (pidm) or for every metric (cfld)")
    parser.add_argument("--protocol", choices=tuple(PROTOCOL_NAMES), default="pidm",
                        help="pidm (default): the PIDM/GFLA protocol described above (PIDM's utils/metrics.py). "
                             "cfld: the metric computation of CFLD's code (models/metrics.py, pose_transfer_test.py): "
                             "the ground truth, generated and real images are resized to 176x256 (352x512) with PIL "
                             "bicubic (antialiased, no crop) and scaled to [0, 1]; FID (then bilinear to 299 and the "
                             "Inception input scaling, as above) and LPIPS (alex, v0.1) on every image, no batch "
                             "dropped; PSNR and two SSIMs on the resized images: `ssim` with a uniform 51x51 window "
                             "on [0, 1] and `ssim_256` with a Gaussian window (sigma 1.5) on 0..255. CFLD's code "
                             "reads the high-resolution DeepFashion images; other inputs (e.g. 256x256 ones) give "
                             "other numbers. The two protocols' numbers are not comparable")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="batch size of the FID and LPIPS passes; it decides which images the legacy drop "
                             "leaves out, so keep 64 for comparable numbers (default 64)")
    parser.add_argument("--keep-last-batch", action="store_true",
                        help="use every image for FID and LPIPS (always so with --protocol cfld; default: drop "
                             "the incomplete last batch as the legacy script does, of the generated and the real "
                             "set alike, e.g. 8512 of 8570 test images; the counts used are printed)")
    parser.add_argument("--stats-cache", type=Path, metavar="DIR",
                        help="cache the real-set FID statistics in DIR, keyed by a hash of the set (file names, "
                             "sizes and mtimes; or the LMDB's keys, value sizes and data.mdb), the network weights "
                             "and the settings; a cache file is checked against that key before use")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the results as JSON: the protocol, ssim (and ssim_256 for cfld) with what "
                             "each is, psnr (Infinity for identical images), fid and lpips when computed, the image "
                             "counts, and why a metric was not computed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for Inception and LPIPS (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N",
                        help="DataLoader worker processes for reading images and computing SSIM (default: up to 8)")
    return parser.parse_args(argv)


def main(argv=None, inception=None, lpips_model=None):
    """Run the evaluation. `inception` (a network mapping (N, 3, 299, 299) to (N, D)) and `lpips_model` replace
    the weight files, so that tests can inject randomly initialised networks."""
    args = parse_args(argv)
    args.keep_last_batch |= args.protocol == "cfld"  # CFLD's code uses every image
    pairs = pair_files(args.generated, args.target, args.naming)
    print(f"{len(pairs)} pairs, {PROTOCOL_NAMES[args.protocol]} protocol at {args.size}, batches of "
          f"{args.batch_size} ({'all images kept' if args.keep_last_batch else 'incomplete last batch dropped'} "
          f"for FID and LPIPS)")
    results, skipped = {"protocol": args.protocol, "size": args.size, "pairs": len(pairs),
                        "ssim_definitions": SSIM_DEFINITIONS[args.protocol]}, {}

    if lpips_model is None:
        trunk, skipped["lpips"] = find_weights(args.lpips_weights, ALEXNET_FILE, "--lpips-weights")
        lpips_model = build_lpips(trunk) if trunk else None
    if lpips_model is not None:
        lpips_model = lpips_model.to(args.device)
    results.update(paired_metrics(pairs, lpips_model, args))

    if args.real_train is None:
        skipped["fid"] = "needs --real-train (the training images)"
    elif inception is None:
        weights, skipped["fid"] = find_weights(args.inception_weights, INCEPTION_FILE, "--inception-weights")
        inception = build_inception(weights) if weights else None
    if inception is not None:
        extractor = InceptionFeatures(inception).to(args.device)
        transform = partial(fid_input, size=args.size, protocol=args.protocol)
        mu_real, sigma_real, n_real = real_statistics(real_images(args.real_train, args.size, transform),
                                                      extractor, args)
        generated = ImageFiles([gen for _, gen in pairs], transform)
        n_gen = used_count(len(generated), args.batch_size, args.keep_last_batch)
        mu, sigma = feature_statistics(extract_features(generated, extractor, n_gen, args, "FID generated"))
        results.update(fid=frechet_distance(mu, sigma, mu_real, sigma_real), fid_generated=n_gen, fid_real=n_real)

    results["not_computed"] = {name: why for name, why in skipped.items() if why}
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def print_table(results):
    pairs = results["pairs"]
    used = {"fid": f"{results.get('fid_generated')} generated vs {results.get('fid_real')} real",
            **{key: f"{pairs} pairs; {what}" for key, what in results["ssim_definitions"].items()},
            "psnr": f"{pairs} pairs", "lpips": f"{results.get('lpips_pairs')} of {pairs} pairs"}
    print(f"\n{PROTOCOL_NAMES[results['protocol']]} protocol\n{'metric':<10}{'value':>10}   images")
    for key, images in used.items():
        if key in results:
            print(f"{key.upper():<10}{results[key]:>10.4f}   {images}")
        else:
            print(f"{key.upper():<10}{'-':>10}   not computed: {results['not_computed'][key]}")


if __name__ == "__main__":
    main()
