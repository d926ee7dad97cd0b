"""Write the pose gallery the web app offers: a dozen target poses drawn by the synthetic dataset's poser
(data/synthetic.py) under fixed seeds, full length, as OpenPose JSON in the DeepFashion convention.

  python -m scripts.make_pose_gallery --out assets/poses

The files are keypoint files like any other: `infer_xmdpt.py --target-pose assets/poses/01_front.json`.
"""
import argparse
from pathlib import Path

import numpy as np

from data.pose import MISSING, RAW_HEIGHT, RAW_WIDTH, from_image_coords, save_openpose_json, visible_joints
from data.synthetic import random_look, random_shot

VIEWS = ["front", "front", "front", "front", "full", "full", "side", "side", "side", "back", "back", "additional"]


def gallery(seed=2024, min_joints=13):
    """(name, keypoints) of the gallery's poses: for each view, the first full-length shot with at least
    `min_joints` joints, drawing looks and shots from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    poses = []
    for i, view in enumerate(VIEWS, 1):
        while True:
            look = random_look(rng)
            shot = random_shot(rng, look, view)
            keypoints = from_image_coords(shot.joints, (RAW_HEIGHT, RAW_WIDTH))
            keypoints[shot.hidden] = MISSING
            if shot.height < 1.1 * look.height and visible_joints(keypoints) >= min_joints:
                break
        poses.append((f"{i:02d}_{view}", np.round(keypoints, 1)))
    return poses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/poses", help="folder of the keypoint files (default: assets/poses)")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the poser (default: 2024)")
    args = parser.parse_args(argv)
    for name, keypoints in gallery(args.seed):
        save_openpose_json(keypoints, Path(args.out) / f"{name}.json")
    print(f"wrote {len(VIEWS)} poses to {args.out}")


if __name__ == "__main__":
    main()
