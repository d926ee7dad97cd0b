"""Generate people in new poses with X-MDPT.

  python infer_xmdpt.py                                   # the demo: bundled model, synthetic test pairs
  python infer_xmdpt.py --fast                            # the same with the bundled 4-step model
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt \\
      --data datasets/deepfashion --out outputs/xmdpt_s  # every DeepFashion test pair
  torchrun --nproc_per_node 4 infer_xmdpt.py --config ... --ckpt ... --data ... --out ...   # the same on 4 GPUs
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose pose.json
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose-from you.jpg

Test pairs are written as <out>/generated/{name}.png with the ground truth <out>/target/{name}.png and the
source <out>/source/{name}.png under the same name ({source}_2_{target}_vis, see eval/fid_ssim_lpips.py),
plus <out>/grids/{name}.png (source | target | skeleton | generated). Pairs already written are skipped, so
an interrupted run continues; --overwrite regenerates them. Each pair's noise comes from --seed and its
index, so results do not depend on the batch size or the number of processes.

Own photos (--source) must show a person (MediaPipe Pose, requirements-photo.txt finds them). Each photo is
framed around its person as DeepFashion frames a figure (--framing whole: the whole photo). The keypoints
found on each photo are written to <out>/poses/{photo}.json (OpenPose format, DeepFashion convention: pass a
corrected one back with --target-pose) with <out>/poses/{photo}_skeleton.png, the skeleton over the framed
photo. A missing or unreadable file, a photo with no person, too few joints or a checkpoint that does not
fit the config ends the run with one line that says so, and exit status 2 (--debug: the traceback).
"""
import argparse
from pathlib import Path

from configs import load_config
from data.errors import InputError, OutputExistsError, reported
from data.images import grid_row, save_png
from data.photo import FRAMINGS, frame_photo, read_photo
from inference.pairs import generate_pairs, mean_scores
from inference.pipeline import SAMPLERS, Pipeline, add_model_arguments, model_files
from inference.poses import pose_from_file, pose_from_photo, save_pose
from models.distributed import barrier, setup_distributed, teardown


def own_photo(args, pipe, out, settings):
    """--source with --target-pose(-from): one image, its grid, and the poses found on the photos."""
    source_rgb = read_photo(args.source)
    source = frame_photo(source_rgb, pipe.size, args.source, args.framing)
    found = [(Path(args.source).stem, source_rgb, source)]
    if args.target_pose_from:
        pose_rgb = read_photo(args.target_pose_from)
        target = pose_from_photo(pose_rgb, pipe.size, args.target_pose_from, args.framing)
        keypoints = target.keypoints
        found.append((Path(args.target_pose_from).stem, pose_rgb, target))
    else:
        keypoints = pose_from_file(args.target_pose)
    path = out / "generated" / f"{Path(args.source).stem}_2_{Path(args.target_pose or args.target_pose_from).stem}.png"
    if path.exists() and not args.overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    image = pipe(source.image[None], keypoints=[keypoints], seeds=[args.seed], **settings)[0]
    save_png(image, path)
    save_png(grid_row(source.image, pipe.skeletons([keypoints])[0] * 2 - 1, image), out / "grids" / path.name)
    poses = [save_pose(rgb, framed, out / "poses", name) for name, rgb, framed in found]
    print(f"wrote {path} and {out / 'grids' / path.name}; the poses found: {', '.join(map(str, poses))}")


def test_pairs(args, cfg, pipe, out, settings, rank, world):
    """Every test pair (or --limit), split across the processes; the scores once, at the end."""
    names, generated = generate_pairs(pipe, args.data or cfg["data"]["root"], out, args.batch_size, args.seed,
                                      args.limit, args.overwrite, not args.no_grids, rank, world, barrier, **settings)
    if world > 1:
        print(f"process {rank + 1} of {world}: generated {generated} pairs")
    barrier()
    if rank == 0:
        scores = mean_scores(out, names)
        print(f"wrote {len(names)} pairs to {out}/generated (targets in {out}/target, sources in {out}/source, "
              f"grids in {out}/grids)")
        print(f"mean SSIM / PSNR against the targets: generated {scores['generated'][0]:.4f} / "
              f"{scores['generated'][1]:.2f} dB, sources {scores['source'][0]:.4f} / {scores['source'][1]:.2f} dB")


def ensure_demo_data(cfg):
    """Make the demo's synthetic set at the config's data.root unless it is there."""
    from data.synthetic import make_synthetic
    root = Path(cfg["data"]["root"])
    if not (root / "test_pairs.txt").is_file():
        print(f"making the synthetic demo set in {root} ...")
        make_synthetic(root, size=cfg["data"]["size"], **cfg["synthetic"])


def parse_args(argv=None):
    """The command line, checked: --source needs a target pose and the other way round."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data", help="dataset root in the DeepFashion layout (default: the config's data.root)")
    p.add_argument("--out", default="outputs/demo", help="output directory")
    p.add_argument("--batch-size", type=int, default=16, help="pairs generated together")
    p.add_argument("--steps", type=int,
                   help="sampling steps (default: the config's sample.steps: 50, or 4 for the fast demo model)")
    p.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance scale s of a diffusion model (default: the config's "
                        "sample.cfg_scale, 2.0; a consistency model has its guidance folded in)")
    p.add_argument("--scale-pow", type=float,
                   help="power p of the power-cosine guidance schedule of a diffusion model (default: the config's "
                        "sample.scale_pow, 0.01)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="ddim: the released DDIM (eta 0); dpm++: DPM-Solver++ (diffusers), good at ~20 steps; lcm: "
                        "the consistency sampler of a distilled model (1-8 steps, guidance folded in). Default: the "
                        "model's own, lcm for a consistency model, else ddim")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--limit", type=int, help="generate only the first N test pairs")
    p.add_argument("--no-grids", action="store_true", help="do not write <out>/grids")
    p.add_argument("--overwrite", action="store_true", help="regenerate outputs that already exist")
    p.add_argument("--source", help="your own photo of a person (instead of the dataset's test pairs); it must show "
                                    "a person (MediaPipe Pose, requirements-photo.txt)")
    p.add_argument("--framing", choices=FRAMINGS, default="person",
                   help="how own photos are framed: person (default) crops around the person with a margin, then "
                        "pads to DeepFashion's 176:256 aspect; whole pads and resizes the whole photo")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-pose", help="target keypoints: a DeepFashion .txt or an OpenPose .json file, in the "
                                         "DeepFashion convention (as <out>/poses/*.json are written)")
    g.add_argument("--target-pose-from", help="another photo whose pose (MediaPipe Pose) is the target, framed as "
                                              "--framing says")
    args = p.parse_args(argv)
    if args.source and not (args.target_pose or args.target_pose_from):
        p.error("--source needs --target-pose or --target-pose-from")
    if (args.target_pose or args.target_pose_from) and not args.source:
        p.error("--target-pose/--target-pose-from need --source")
    args.config, args.ckpt = model_files(p, args)
    return args


def run(args):
    """Build the pipeline once, then generate the test pairs or the own photo."""
    cfg = load_config(args.config)
    rank, world, device = setup_distributed()
    try:
        if "synthetic" in cfg and args.data is None and rank == 0:
            ensure_demo_data(cfg)
        barrier()
        pipe = Pipeline.from_config(cfg, args.ckpt, args.device or device, args.compile)
        if pipe.model.consistency and (args.cfg_scale is not None or args.scale_pow is not None):
            raise InputError(f"--cfg-scale and --scale-pow do not apply to {pipe.description}: a consistency model "
                             f"has the guidance it was distilled with folded into its weights")
        settings = dict(steps=args.steps, cfg_scale=args.cfg_scale, scale_pow=args.scale_pow,
                        sampler=pipe.sampler_for(args.sampler))
        if args.source:
            own_photo(args, pipe, Path(args.out), settings)
        else:
            test_pairs(args, cfg, pipe, Path(args.out), settings, rank, world)
    finally:
        teardown()


def main(argv=None):
    """Generate as the command line says; a user error ends in one line and exit status 2."""
    args = parse_args(argv)
    with reported("infer_xmdpt.py", args.debug):
        run(args)


if __name__ == "__main__":
    main()
