"""Write the LMDBs of DeepFashion In-shop images that training and inference read.

    python -m scripts.prepare_deepfashion --root datasets/deepfashion --sizes 256 512 --workers 8

`--root` holds `img/` (DeepFashion's img_highres folder, renamed), `train_pairs.txt`, `test_pairs.txt`,
`train.lst`, `test.lst` and `pose/`. Every image named by the pair files is resized straight to SxS
(PIL bicubic, as PIDM prepares it: a horizontal stretch of the 176:256 pictures, no padding) and stored
as PNG bytes in `{out}/{S}-{S}/` under the image path with a .png extension.
"""

import argparse
import os

from data.deepfashion import prepare_lmdbs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True,
                        help="DeepFashion folder: img/, train_pairs.txt, test_pairs.txt, pose/")
    parser.add_argument("--out", default=None, help="where to write the {S}-{S}/ LMDBs (default: --root)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256],
                        help="square image sizes to write, one LMDB each (default: 256)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that decode and resize images (default: min(8, CPUs))")
    parser.add_argument("--overwrite", action="store_true", help="replace LMDBs that already exist")
    args = parser.parse_args(argv)
    for path in prepare_lmdbs(args.root, args.sizes, args.out, args.workers, args.overwrite):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
