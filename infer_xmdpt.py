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

import torch

from configs import load_config
from data.pose import MISSING, draw_skeleton, load_keypoints, to_image_coords
from inference import Pipeline
from inference.pairs import generate_pairs, grid_row, mean_scores, save_png

ROOT = Path(__file__).resolve().parent
MIN_JOINTS = 4  # a target pose with fewer visible joints says too little to be drawn
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_CKPT = ROOT / "assets" / "xmdpt_demo"


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
                                  "an export folder (default: the bundled demo model, assets/xmdpt_demo)")
    p.add_argument("--data", help="dataset root in the DeepFashion layout (default: the config's data.root)")
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="pairs generated together")
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's sample.steps, 50)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale s (default: the config's sample.cfg_scale, 2.0)")
    p.add_argument("--scale-pow", type=float,
                   help="power p of the power-cosine guidance schedule (default: the config's sample.scale_pow, 0.01)")
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
    if demo and args.data is None:
        ensure_demo_data(cfg)
    out = Path(args.out)
    pipe = Pipeline.from_config(cfg, args.ckpt or DEMO_CKPT, args.device)
    settings = dict(steps=args.steps, cfg_scale=args.cfg_scale, scale_pow=args.scale_pow, sampler=args.sampler)
    if args.source:
        source, skeleton, name = photo_inputs(args, pipe.size)
        path = out / "generated" / f"{name}.png"
        if path.exists() and not args.overwrite:
            sys.exit(f"{path} exists; pass --overwrite to replace it")
        image = pipe(source[None], skeletons=skeleton[None], seeds=[args.seed], **settings)[0]
        save_png(image, path)
        save_png(grid_row(source, skeleton * 2 - 1, image), out / "grids" / f"{name}.png")
        print(f"wrote {path} and {out / 'grids' / f'{name}.png'}")
        return
    names = generate_pairs(pipe, args.data or cfg["data"]["root"], out, args.batch_size, args.seed, args.limit,
                           args.overwrite, not args.no_grids, **settings)
    scores = mean_scores(out, names)
    print(f"wrote {len(names)} pairs to {out}/generated (targets in {out}/target, sources in {out}/source, "
          f"grids in {out}/grids)")
    print(f"mean SSIM / PSNR against the targets: generated {scores['generated'][0]:.4f} / "
          f"{scores['generated'][1]:.2f} dB, sources {scores['source'][0]:.4f} / {scores['source'][1]:.2f} dB")


if __name__ == "__main__":
    main()
