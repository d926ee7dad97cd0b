"""Generate people in new poses with X-MDPT.

  python infer_xmdpt.py                                   # the demo: bundled checkpoint, synthetic test pairs
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt \\
      --data datasets/deepfashion --out outputs/xmdpt_s  # every DeepFashion test pair
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose pose.json
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose-from you.jpg

Test pairs are written as <out>/generated/{name}.png with the ground truth <out>/target/{name}.png and the
source <out>/source/{name}.png under the same name ({source}_2_{target}_vis, see eval/fid_ssim_lpips.py),
plus <out>/grids/{name}.png (source | target | skeleton | generated). Pairs already written are skipped, so
an interrupted run continues; --overwrite regenerates them. Each pair's noise comes from --seed and its
index, so results do not depend on the batch size.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from configs import load_config, model_arch
from data.deepfashion import PairDataset
from data.pose import MISSING, dino_input, draw_skeleton, load_keypoints, to_image_coords
from models import Diffusion, XMDPT
from models.checkpoint import read_checkpoint, strict_load
from models.encoders import build_encoders

ROOT = Path(__file__).resolve().parent
MIN_JOINTS = 4  # a target pose with fewer visible joints says too little to be drawn
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_CKPT = ROOT / "assets" / "xmdpt_demo.safetensors"
# What a checkpoint and a config must agree on to be used together.
ARCH_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
             "learn_sigma", "pose_dim", "image_dim", "aggregation", "dino_tokens", "prediction")


def load_model(cfg, ckpt, encoders):
    """The checkpoint's weights in the architecture of the config, checked to agree."""
    state_dict, arch, saved = read_checkpoint(ckpt)
    wanted = model_arch(cfg, encoders.pose_dim, encoders.image_dim)
    diffs = [f"{k}: {arch.get(k)} in the checkpoint, {wanted.get(k)} in the config" for k in ARCH_KEYS
             if arch.get(k) != wanted.get(k)]
    if diffs:
        raise ValueError(f"--ckpt {ckpt} does not fit --config:\n  " + "\n  ".join(diffs))
    if not saved:
        arch = dict(arch, decode_layer=wanted["decode_layer"])
    model = XMDPT(**arch)
    strict_load(model, state_dict, f"--ckpt {ckpt}")
    return model.eval()


def to_uint8(x):
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(x, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(x)).save(path)


class Generator:
    """Encoders, model and sampler wired together: generate(source images, target skeletons, seeds)."""

    def __init__(self, cfg, ckpt, device, steps=50, cfg_scale=2.0, scale_pow=0.01, sampler="ddim"):
        self.device = torch.device(device)
        self.encoders = build_encoders(cfg["encoders"], self.device)
        self.model = load_model(cfg, ckpt, self.encoders).to(self.device)
        self.diffusion = Diffusion(prediction=self.model.arch["prediction"])
        self.steps, self.cfg_scale, self.scale_pow, self.sampler = steps, cfg_scale, scale_pow, sampler
        self.clip_denoised = cfg["sample"]["clip_denoised"]
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def generate(self, sources, skeletons, seeds):
        """sources (N, 3, S, S) in [-1, 1], target skeletons (N, 3, S, S) in [0, 1] -> images in [-1, 1]."""
        enc, dev = self.encoders, self.device
        sources, skeletons = sources.to(dev), skeletons.to(dev)
        gens = [torch.Generator(dev).manual_seed(int(s)) for s in seeds]
        mean, logvar = enc.first_stage.moments(sources)
        source_latent = torch.cat([enc.first_stage.sample_from_moments(m[None], l[None], generator=g)
                                   for m, l, g in zip(mean, logvar, gens)])
        z = torch.cat([torch.randn(source_latent[:1].shape, generator=g, device=dev) for g in gens])
        with self.autocast:
            fn = self.model.guided(enc.pose(dino_input(skeletons)), enc.image(dino_input(sources)), source_latent,
                                   self.cfg_scale, self.scale_pow)
            if self.sampler == "dpm++":
                latents = self.diffusion.dpm_solver_sample(fn, z, steps=self.steps)
            else:
                latents = self.diffusion.ddim_sample(fn, z, steps=self.steps, clip_denoised=self.clip_denoised)
        return enc.first_stage.decode(latents.float()).clamp(-1, 1)


def grid_row(*images):
    """Images in [-1, 1] side by side (skeletons, in [0, 1], are passed as 2s - 1)."""
    return torch.cat(images, dim=-1)


def run_pairs(gen, data_root, size, out, batch_size, seed, limit=None, overwrite=False, grids=True):
    """Generate every test pair (or the first `limit`); returns the names written or found."""
    pairs = PairDataset(data_root, size, "test")
    count = len(pairs) if limit is None else min(limit, len(pairs))
    names = [pairs.pair_name(i) for i in range(count)]
    todo = [i for i, name in enumerate(names)
            if overwrite or not all((out / d / f"{name}.png").is_file() for d in ("generated", "target", "source"))]
    if len(todo) < count:
        print(f"{count - len(todo)} of {count} pairs already generated in {out}; skipping them "
              f"(--overwrite regenerates)")
    for start in tqdm(range(0, len(todo), batch_size), desc="pairs", unit="batch"):
        items = [pairs[i] for i in todo[start:start + batch_size]]
        stack = lambda k: torch.stack([it[k] for it in items])
        images = gen.generate(stack("source"), stack("target_skeleton"),
                              [seed * 1_000_003 + i for i in todo[start:start + batch_size]])
        for item, image in zip(items, images):
            name = item["name"]
            save_png(image, out / "generated" / f"{name}.png")
            save_png(item["target"], out / "target" / f"{name}.png")
            save_png(item["source"], out / "source" / f"{name}.png")
            if grids:
                save_png(grid_row(item["source"], item["target"], item["target_skeleton"] * 2 - 1, image.cpu()),
                         out / "grids" / f"{name}.png")
    return names


def photo_inputs(args, size):
    """(source image, target skeleton, output name) for --source with --target-pose(-from)."""
    from data.photo import fit_photo, keypoints_from_photo, read_photo
    source, _ = fit_photo(read_photo(args.source), size)
    if args.target_pose_from:
        keypoints = keypoints_from_photo(args.target_pose_from, size, min_joints=MIN_JOINTS)
        pose_name = Path(args.target_pose_from).stem
    else:
        keypoints = load_keypoints(args.target_pose)
        visible = int((keypoints != MISSING).all(axis=1).sum())
        if visible < MIN_JOINTS:
            raise ValueError(f"{args.target_pose}: only {visible} of 18 joints are visible; a target pose needs "
                             f"at least {MIN_JOINTS}")
        pose_name = Path(args.target_pose).stem
    skeleton = draw_skeleton(to_image_coords(keypoints, (size, size)), (size, size))
    return source, skeleton, f"{Path(args.source).stem}_2_{pose_name}"


def mean_scores(out, names):
    """Mean SSIM and PSNR of generated and of source images against the targets."""
    from eval.metrics import psnr, ssim
    read = lambda d, n: np.asarray(Image.open(out / d / f"{n}.png").convert("RGB"))
    scores = {"generated": ([], []), "source": ([], [])}
    for name in names:
        target = read("target", name)
        for kind in scores:
            image = read(kind, name)
            scores[kind][0].append(ssim(target, image))
            scores[kind][1].append(psnr(target, image))
    return {kind: (float(np.mean(s)), float(np.mean(p))) for kind, (s, p) in scores.items()}


def ensure_demo_data(cfg):
    from data.synthetic import make_synthetic
    root = Path(cfg["data"]["root"])
    if not (root / "test_pairs.txt").is_file():
        print(f"making the synthetic demo set in {root} ...")
        make_synthetic(root, size=cfg["data"]["size"], **cfg["synthetic"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config of the model and encoders (default: the demo's)")
    p.add_argument("--ckpt", help="a released state dict (.pt), our training checkpoint (EMA weights are used) or "
                                  "a .safetensors export (default: the bundled demo checkpoint)")
    p.add_argument("--data", help="dataset root in the DeepFashion layout (default: the config's data.root)")
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="pairs generated together")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale s")
    p.add_argument("--scale-pow", type=float, default=0.01, help="power p of the power-cosine guidance schedule")
    p.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim",
                   help="ddim: the released DDIM (eta 0); dpm++: DPM-Solver++ (diffusers), good at ~20 steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--limit", type=int, help="generate only the first N test pairs")
    p.add_argument("--no-grids", action="store_true", help="do not write <out>/grids")
    p.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--source", help="your own photo of a person (instead of the dataset's test pairs)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-pose", help="target keypoints: a DeepFashion .txt or an OpenPose .json file")
    g.add_argument("--target-pose-from", help="another photo whose pose (MediaPipe Pose) is the target")
    args = p.parse_args(argv)
    if args.source and not (args.target_pose or args.target_pose_from):
        p.error("--source needs --target-pose or --target-pose-from")
    if (args.target_pose or args.target_pose_from) and not args.source:
        p.error("--target-pose/--target-pose-from need --source")
    if bool(args.config) != bool(args.ckpt):
        p.error("give --config and --ckpt together (or neither, for the demo)")
    return args


def main(argv=None):
    args = parse_args(argv)
    demo = args.config is None
    cfg = load_config(args.config or DEMO_CONFIG)
    ckpt = args.ckpt or DEMO_CKPT
    if demo and args.data is None:
        ensure_demo_data(cfg)
    size = cfg["data"]["size"]
    out = Path(args.out)
    gen = Generator(cfg, ckpt, args.device, args.steps, args.cfg_scale, args.scale_pow, args.sampler)
    if args.source:
        source, skeleton, name = photo_inputs(args, size)
        path = out / "generated" / f"{name}.png"
        if path.exists() and not args.overwrite:
            sys.exit(f"{path} exists; pass --overwrite to replace it")
        image = gen.generate(source[None], skeleton[None], [args.seed])[0].cpu()
        save_png(image, path)
        save_png(grid_row(source, skeleton * 2 - 1, image), out / "grids" / f"{name}.png")
        print(f"wrote {path} and {out / 'grids' / f'{name}.png'}")
        return
    names = run_pairs(gen, args.data or cfg["data"]["root"], size, out, args.batch_size, args.seed, args.limit,
                      args.overwrite, not args.no_grids)
    scores = mean_scores(out, names)
    print(f"wrote {len(names)} pairs to {out}/generated (targets in {out}/target, sources in {out}/source, "
          f"grids in {out}/grids)")
    print(f"mean SSIM / PSNR against the targets: generated {scores['generated'][0]:.4f} / "
          f"{scores['generated'][1]:.2f} dB, sources {scores['source'][0]:.4f} / {scores['source'][1]:.2f} dB")


if __name__ == "__main__":
    main()
