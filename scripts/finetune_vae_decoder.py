"""Fine-tune the SD VAE decoder on the training images, as the paper does; the encoder stays frozen.

Reads the DeepFashion LMDB ({data}/{size}-{size}/, key = image path with .png, value = PNG bytes; the images
listed in {data}/{split}.lst), decodes a posterior sample of each image and trains the decoder on
L1 + mse_weight * MSE. (LPIPS is left out: its VGG/AlexNet backbone would have to be downloaded.)
Saves a diffusers-format AutoencoderKL that VAEFirstStage.from_pretrained loads.

    python scripts/finetune_vae_decoder.py --data datasets/deepfashion --vae weights/sd-vae-ft-mse \
        --out weights/vae-ft-deepfashion --steps 10000 --batch-size 8
"""
import argparse
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

import lmdb
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.encoders import load_autoencoder  # noqa: E402

FROZEN_PREFIXES = ("encoder.", "quant_conv.")  # everything before the latent; the decoder side trains


class LmdbImages(Dataset):
    """The images of a split from the DeepFashion LMDB, as (3, size, size) float tensors in [-1, 1]."""

    def __init__(self, root, size, split="train"):
        self.db_path = str(Path(root) / f"{size}-{size}")
        lines = (Path(root) / f"{split}.lst").read_text().splitlines()
        self.keys = [os.path.splitext(line.strip())[0] + ".png" for line in lines if line.strip()]
        self.env = None  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        if self.env is None:
            self.env = lmdb.open(self.db_path, readonly=True, lock=False, readahead=False)
        with self.env.begin() as txn:
            data = txn.get(self.keys[i].encode())
        if data is None:
            raise KeyError(f"{self.keys[i]} is not in the LMDB {self.db_path}")
        image = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1


def save_atomically(vae, out_dir):
    """save_pretrained into a temporary sibling directory, then swap it in with renames."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    vae.save_pretrained(tmp)
    old = tmp.with_name(tmp.name + "-old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def finetune_decoder(vae_dir, data, out, size=256, split="train", steps=10000, batch_size=8, lr=1e-4,
                     mse_weight=1.0, device="cpu", num_workers=4, seed=0, save_every=0, progress=True):
    """Fine-tune the decoder of the VAE in vae_dir and save it to out; returns the loss of every step."""
    torch.manual_seed(seed)
    vae = load_autoencoder(vae_dir).to(device)
    for name, p in vae.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    vae.eval()
    vae.decoder.train()
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr)
    dataset = LmdbImages(data, size, split)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=len(dataset) >= batch_size)
    device_type = torch.device(device).type

    def batches():
        while True:
            yield from loader

    losses = []
    bar = tqdm(zip(range(steps), batches()), total=steps, disable=not progress)
    for step, x in bar:
        x = x.to(device)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            recon = vae.decode(z).sample.float()
        loss = F.l1_loss(recon, x) + mse_weight * F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_atomically(vae, out)
    save_atomically(vae, out)
    return losses


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset root: {split}.lst and the {size}-{size} LMDB")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory to start from")
    p.add_argument("--out", required=True, help="output directory (diffusers format, replaced atomically)")
    p.add_argument("--size", type=int, default=256, help="image size: reads the {size}-{size} LMDB")
    p.add_argument("--split", default="train", help="image list to train on: {data}/{split}.lst")
    p.add_argument("--steps", type=int, default=10000, help="optimisation steps")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--mse-weight", type=float, default=1.0, help="loss = L1 + mse_weight * MSE")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (bf16 autocast on CUDA)")
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="torch seed (shuffling and posterior samples)")
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: only at the end)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    finetune_decoder(a.vae, a.data, a.out, size=a.size, split=a.split, steps=a.steps,
                     batch_size=a.batch_size, lr=a.lr, mse_weight=a.mse_weight, device=a.device,
                     num_workers=a.num_workers, seed=a.seed, save_every=a.save_every)


if __name__ == "__main__":
    main()
