"""Export a checkpoint's weights in the Hugging Face layout: a folder with config.json and model.safetensors.

  python -m scripts.export_weights --ckpt runs/xmdpt_s/checkpoints/0300000.pt --out weights/xmdpt_s
  python -m scripts.export_weights --ckpt ema_0.9999_300000.pt --out weights/xmdpt_s   # a released file

By default the EMA weights of our training checkpoints are exported, without MIPNet (it only trains), in
float32. The folder loads with `models.load_checkpoint`, `XMDPT.from_pretrained` and `infer_xmdpt.py --ckpt`.
"""
import argparse

import torch

from models import export, load_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="our training checkpoint, a released state dict, or an export")
    parser.add_argument("--out", required=True, help="the folder to write (replaced atomically if it exists)")
    parser.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA weights")
    parser.add_argument("--keep-mipnet", action="store_true", help="keep MIPNet (needed only to continue training)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="storage type of the weights")
    args = parser.parse_args(argv)
    model = load_checkpoint(args.ckpt, use_ema=not args.raw)
    out = export(model, args.out, inference_only=not args.keep_mipnet, dtype=getattr(torch, args.dtype))
    size = (out / "model.safetensors").stat().st_size / 2 ** 20
    print(f"wrote {out} ({size:.1f} MiB, {'EMA' if not args.raw else 'raw'} weights, {args.dtype})")


if __name__ == "__main__":
    main()
