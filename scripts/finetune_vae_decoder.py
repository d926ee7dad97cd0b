"""Fine-tune the SD VAE decoder on the training images, as the paper does; the encoder stays frozen.

Reads the DeepFashion LMDB ({data}/{size}-{size}/, key = image path with .png, value = PNG bytes; the images
listed in {data}/{split}.lst, by path or flat name), decodes a posterior sample of each image and trains the decoder on
L1 + mse_weight * MSE. (LPIPS is left out: its VGG/AlexNet backbone would have to be downloaded.)
Saves a diffusers-format AutoencoderKL that VAEFirstStage.from_pretrained loads.

    python -m scripts.finetune_vae_decoder --data datasets/deepfashion --vae weights/sd-vae-ft-mse \
        --out weights/vae-ft-deepfashion --steps 10000 --batch-size 8
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.deepfashion import ImageList, open_images
from data.files import atomic_path
from data.images import to_tensor
from devices import autocast, default_device
from eval.images import listed_keys
from models.encoders import load_autoencoder

FROZEN_PREFIXES = ("encoder.", "quant_conv.")  # everything before the latent; the decoder side trains


def split_images(root, size, split="train"):
    """The images of {root}/{split}.lst (image paths or flat names) from the LMDB, as (3, size, size) float
    tensors in [-1, 1]."""
    images = open_images(root, size)
    keys = listed_keys(images.keys(), Path(root) / f"{split}.lst", f"the LMDB {images.path}")
    return ImageList(images, keys, to_tensor, size)


def save_atomically(vae, out):
    """save_pretrained into a folder beside `out`, then renamed into place."""
    with atomic_path(out, durable=True) as staged:
        vae.save_pretrained(staged)


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
    dataset = split_images(data, size, split)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        drop_last=len(dataset) >= batch_size)

    def batches():
        while True:
            yield from loader

    losses = []
    bar = tqdm(zip(range(steps), batches()), total=steps, disable=not progress)
    for step, x in bar:
        x = x.to(device)
        with autocast(device):
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
    p.add_argument("--device", default=str(default_device()),
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
