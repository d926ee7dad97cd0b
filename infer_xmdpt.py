"""Generate people in new poses with X-MDPT.

  python infer_xmdpt.py                                   # the demo: bundled model, synthetic test pairs
  python infer_xmdpt.py --fast                            # the same with the bundled 4-step model
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt \\
      --data datasets/deepfashion --out outputs/xmdpt_s  # every DeepFashion test pair
  torchrun --nproc_per_node 4 infer_xmdpt.py --config ... --ckpt ... --data ... --out ...   # the same on 4 GPUs
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose pose.json
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose poses/  # many poses
  python infer_xmdpt.py --config configs/xmdpt_s.yaml --ckpt ... --source me.jpg --target-pose-from a.jpg b.jpg

Test pairs are written as <out>/generated/{name}.png with the ground truth <out>/target/{name}.png and the
source <out>/source/{name}.png under the same name ({source}_2_{target}_vis, see eval/fid_ssim_lpips.py),
plus <out>/grids/{name}.png (source | target | skeleton | generated). Each pair's noise comes from --seed and its
index, so results do not depend on the batch size or the number of processes. Pairs that share a source photo
are generated together, the photo encoded once for all of them.

Own photos (--source) must show a person (MediaPipe Pose, requirements-photo.txt finds them). Each photo is
framed around its person as DeepFashion frames a figure (--framing whole: the whole photo). One photo goes into
every target pose given (keypoint files, folders of them, or photos), encoded once: one image per pose,
<out>/generated/{photo}_2_{pose}.png with its grid, and the contact sheet <out>/{photo}_poses.png (the photo,
then each pose's skeleton over its image). Every pose's noise comes from --seed, so an image depends only on
the photo, the pose and the seed. The keypoints found on each photo are written to <out>/poses/{photo}.json
(OpenPose format, DeepFashion convention: pass a corrected one back with --target-pose) with
<out>/poses/{photo}_skeleton.png, the skeleton over the framed photo.

Images already written are skipped, so an interrupted run continues; --overwrite regenerates them. A missing or
unreadable file, an empty folder, a photo with no person, too few joints or a checkpoint that does not fit the
config ends the run with one line that says so, and exit status 2 (--debug: the traceback), before anything is
generated and with nothing already written lost.
"""
import argparse
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from configs import load_config
from data.errors import reported
from data.images import grid_row, save_png, to_tensor
from data.photo import FRAMINGS, frame_photo, read_photo
from devices import barrier, setup_distributed, teardown
from inference.pairs import check_claim, claim, generate_pairs, made_by, mean_scores
from inference.pipeline import SAMPLERS, Pipeline, add_model_arguments, model_files
from inference.poses import contact_sheet, pose_files, pose_from_file, pose_from_photo, save_pose, unique_names


def own_photo(args, pipe, out, settings):
    """--source with its target poses: every pose read and checked first, then the photo encoded once and one
    image per pose not yet written, its grid, the contact sheet, and the poses found on the photos."""
    source_rgb = read_photo(args.source)
    source = frame_photo(source_rgb, pipe.size, args.source, args.framing)
    found, targets = [(Path(args.source).stem, source_rgb, source)], {}
    if args.target_pose_from:
        unique_names(args.target_pose_from)
        for photo in tqdm(args.target_pose_from, desc="pose photos", disable=len(args.target_pose_from) < 2 or None):
            rgb = read_photo(photo)
            framed = pose_from_photo(rgb, pipe.size, photo, args.framing)
            targets[Path(photo).stem] = framed.keypoints
            found.append((Path(photo).stem, rgb, framed))
    else:
        targets = {path.stem: pose_from_file(path) for path in pose_files(args.target_pose)}
    names = {pose: f"{Path(args.source).stem}_2_{pose}.png" for pose in targets}
    todo = [pose for pose, name in names.items() if args.overwrite or not (out / "generated" / name).is_file()]
    record = made_by(pipe, settings, seed=args.seed, framing=args.framing)
    claim(out, record, check_claim(out, record, list(names.values()), args.overwrite))
    if len(todo) < len(targets):
        print(f"{len(targets) - len(todo)} of {len(targets)} poses already generated in {out}; skipping them "
              f"(--overwrite regenerates)")
    features = pipe.encode_sources(source.image[None])  # the photo's share of encoding, once for every pose
    for start in tqdm(range(0, len(todo), args.batch_size), desc="poses", unit="batch", disable=len(todo) < 2 or None):
        batch = todo[start:start + args.batch_size]
        skeletons = pipe.skeletons([targets[pose] for pose in batch])
        images = pipe.in_poses(features, skeletons, seed=args.seed, settings=settings)
        for pose, skeleton, image in zip(batch, skeletons, images):
            save_png(image, out / "generated" / names[pose])
            save_png(grid_row(source.image, skeleton * 2 - 1, image), out / "grids" / names[pose])
    sheet = out / f"{Path(args.source).stem}_poses.png"
    save_png(contact_sheet(source.image, [(targets[pose], to_tensor(Image.open(out / "generated" / name)))
                                          for pose, name in names.items()]), sheet)
    poses = [save_pose(rgb, framed, out / "poses", name) for name, rgb, framed in found]
    print(f"wrote {len(todo)} of {len(targets)} images to {out / 'generated'} (grids in {out / 'grids'}) and the "
          f"contact sheet {sheet}; the poses found: {', '.join(map(str, poses))}")


def test_pairs(args, cfg, pipe, out, settings, rank, world):
    """Every test pair (or --limit), split across the processes; the scores once, at the end."""
    names, generated = generate_pairs(pipe, args.data or cfg["data"]["root"], out, settings=settings,
                                      batch_size=args.batch_size, seed=args.seed, limit=args.limit,
                                      overwrite=args.overwrite, grids=not args.no_grids, rank=rank, world=world,
                                      barrier=barrier)
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
    p.add_argument("--out", help="output directory (default: outputs/demo for test pairs, outputs/photos with "
                                 "--source; outputs/demo_fast and outputs/photos_fast with --fast)")
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
    p.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    p.add_argument("--source", help="your own photo of a person (instead of the dataset's test pairs), generated in "
                                    "every target pose given; it must show a person (MediaPipe Pose, "
                                    "requirements-photo.txt)")
    p.add_argument("--framing", choices=FRAMINGS, default="person",
                   help="how own photos are framed: person (default) crops around the person with a margin, then "
                        "pads to DeepFashion's 176:256 aspect; whole pads and resizes the whole photo")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-pose", nargs="+", metavar="FILE_OR_FOLDER",
                   help="target keypoints: DeepFashion .txt or OpenPose .json files in the DeepFashion convention (as "
                        "<out>/poses/*.json are written), or folders of them; one image per pose")
    g.add_argument("--target-pose-from", nargs="+", metavar="PHOTO",
                   help="other photos whose poses (MediaPipe Pose) are the targets, framed as --framing says; one "
                        "image per photo")
    args = p.parse_args(argv)
    if args.source and not (args.target_pose or args.target_pose_from):
        p.error("--source needs --target-pose or --target-pose-from")
    if (args.target_pose or args.target_pose_from) and not args.source:
        p.error("--target-pose/--target-pose-from need --source")
    args.config, args.ckpt = model_files(p, args)
    args.out = args.out or ("outputs/photos" if args.source else "outputs/demo") + ("_fast" if args.fast else "")
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
        settings = pipe.settings(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                                 scale_pow=args.scale_pow)
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
