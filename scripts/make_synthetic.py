"""Render the synthetic pose-transfer dataset in the DeepFashion layout (see data/synthetic.py).

    python -m scripts.make_synthetic --root datasets/synthetic --identities 200 --poses 5 --sizes 64

Every tool that reads DeepFashion (training, inference, evaluation) works on it unchanged.
"""

import argparse

from data.synthetic import make_synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="output folder (the dataset root)")
    parser.add_argument("--identities", type=int, default=200, help="number of figures (default: 200)")
    parser.add_argument("--poses", type=int, default=5, help="images per figure (default: 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64],
                        help="square image sizes, one LMDB {S}-{S}/ each (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    parser.add_argument("--test-fraction", type=float, default=0.1,
                        help="fraction of the figures held out for the test split (default: 0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already at --root")
    args = parser.parse_args(argv)
    counts = make_synthetic(args.root, args.identities, args.poses, args.sizes, args.seed, args.test_fraction,
                            args.overwrite, progress=True)
    print(", ".join(f"{key}: {value}" for key, value in counts.items()))


if __name__ == "__main__":
    main()
