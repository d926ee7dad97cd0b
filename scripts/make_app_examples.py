"""Write the web app's example photos: test sources of the demo's synthetic set, as the LMDB holds them, each with
its keypoints as OpenPose JSON in the DeepFashion convention (a dataset picture is framed already: the app needs
no detection for it).

  python -m scripts.make_app_examples --out assets/examples

The demo set must be there (python infer_xmdpt.py makes it).
"""
import argparse
from pathlib import Path

from configs import load_config
from data.deepfashion import PairDataset
from data.images import save_png
from data.pose import save_openpose_json
from inference.pipeline import DEMO_CONFIG


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/examples", help="folder of the examples (default: assets/examples)")
    parser.add_argument("--count", type=int, default=4, help="examples, one per person (default: 4)")
    args = parser.parse_args(argv)
    cfg = load_config(DEMO_CONFIG)
    pairs = PairDataset(cfg["data"]["root"], cfg["data"]["size"], "test")
    persons = {}
    for target, sources in pairs.pairs:
        persons.setdefault(Path(sources[0]).parent.name, []).append(sources[0])
    chosen = [views[k % len(views)] for k, views in enumerate(persons.values())]  # person k: its k-th view
    for source in chosen[:args.count]:
        name = f"{Path(source).parent.name}_{Path(source).stem}"
        save_png(pairs.load_image(source), Path(args.out) / f"{name}.png")
        save_openpose_json(pairs.load_keypoints(source), Path(args.out) / f"{name}.json")
    print(f"wrote {len(chosen[:args.count])} examples to {args.out}")


if __name__ == "__main__":
    main()
