"""Export a checkpoint's weights to safetensors, with the architecture in the file's metadata.

  python scripts/export_weights.py --ckpt runs/xmdpt_s/checkpoints/0300000.pt --out xmdpt_s.safetensors
  python scripts/export_weights.py --ckpt ema_0.9999_300000.pt --out xmdpt_s.safetensors   # a released file

By default the EMA weights of our training checkpoints are exported, without MIPNet (it only trains),
in float32. The result loads with models.load_checkpoint and infer_xmdpt.py --ckpt.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import load_checkpoint, save_safetensors  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="our training checkpoint, a released state dict, or safetensors")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA weights")
    parser.add_argument("--keep-mipnet", action="store_true", help="keep MIPNet (needed only to continue training)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the weights")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.ckpt, use_ema=not args.raw)
    save_safetensors(model, args.out, inference_only=not args.keep_mipnet, dtype=getattr(torch, args.dtype))
    size = Path(args.out).stat().st_size / 2 ** 20
    print(f"wrote {args.out} ({size:.1f} MiB, {'EMA' if not args.raw else 'raw'} weights, {args.dtype})")


if __name__ == "__main__":
    main()
