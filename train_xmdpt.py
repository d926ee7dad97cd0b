"""Train X-MDPT on a DeepFashion-layout dataset, on one GPU, several (torchrun), or the CPU.

  python train_xmdpt.py --config configs/xmdpt_s.yaml --out runs/xmdpt_s [section.key=value ...]
  torchrun --nproc_per_node 2 train_xmdpt.py --config configs/xmdpt_l_512.yaml --out runs/l512

Each step sums the hybrid loss of an unmasked forward and (with MIPNet) of a masked forward on the same
x_t, t and noise. The frozen encoders run only on what the step uses (the target's skeleton, the source
image, both latents), or not at all with a feature cache (data.cache). The run directory holds log.csv,
TensorBoard events, sample grids and atomic checkpoints; --resume continues from the newest one exactly.
"""
import argparse
import contextlib
import csv
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from configs import load_config, model_arch
from data.cache import CachedPairs, FeatureCache, encoder_signature
from data.deepfashion import PairDataset
from data.sampler import ResumableSampler, SeededDataset
from models import XMDPT, Diffusion
from models.encoders import build_encoders

# Keys that may change between a run and its resumption.
RUN_KEYS = {"max_steps", "ckpt_every", "log_every", "sample_every", "workers"}
LOG_COLUMNS = ["step", "loss", "mse", "vb", "m_loss", "m_mse", "m_vb", "lr", "steps_per_s"]


class Objective(nn.Module):
    """The loss of one step, as one module so that DistributedDataParallel sees one forward per backward."""

    def __init__(self, model, diffusion):
        super().__init__()
        self.model, self.diffusion = model, diffusion

    def forward(self, x0, pose, image, source):
        t = self.diffusion.sample_timesteps(x0.shape[0], x0.device)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        cond = dict(pose=pose, image=image, source=source)
        terms = {k: v.mean() for k, v in self.diffusion.training_losses(self.model, x0, t, cond, noise).items()}
        if self.model.mipnet is not None:
            masked = self.diffusion.training_losses(self.model, x0, t, dict(cond, mask=True), noise)
            terms.update({"m_" + k: v.mean() for k, v in masked.items()})
        terms["total"] = terms["loss"] + terms.get("m_loss", 0.0)
        return terms


def step_inputs(batch, encoders, device):
    """(x0, pose tokens, image tokens, source latent) of a batch, from pixels or from cached features."""
    fs = encoders.first_stage
    get = lambda k: batch[k].to(device, non_blocking=True)
    if "target_mean" in batch:
        x0 = fs.sample_from_moments(get("target_mean"), get("target_logvar"))
        source = fs.sample_from_moments(get("source_mean"), get("source_logvar"))
        return x0, get("target_pose_tokens"), get("source_image_tokens"), source
    x0 = fs.encode(get("target"))
    source = fs.encode(get("source"))
    return x0, encoders.pose(get("target_pose_dino")), encoders.image(get("source_dino")), source


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_save(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def newest_checkpoint(out):
    ckpts = sorted((Path(out) / "checkpoints").glob("*.pt"))
    return ckpts[-1] if ckpts else None


def config_differences(saved, current, prefix=""):
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key in RUN_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} in the run, {b!r} now")
    return diffs


class CSVLog:
    """log.csv with a header; on resume, rows after the resumed step are dropped."""

    def __init__(self, path, resume_step):
        self.path = Path(path)
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row):
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore").writerow(row)


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_data(cfg, split, signature):
    d = cfg["data"]
    pairs = PairDataset(d["root"], d["size"], split, scale_jitter=d["scale_jitter"])
    if split == "train" and d["cache"]:
        return CachedPairs(pairs, FeatureCache(d["cache"], signature))
    return pairs


@torch.no_grad()
def sample_grid(ema, diffusion, encoders, fixed, cfg):
    """source | target | skeleton | generated, one row per held-out pair, in [0, 1]."""
    from torchvision.utils import make_grid
    s = cfg["sample"]
    fn = ema.guided(fixed["pose"], fixed["image"], fixed["source_latent"], s["cfg_scale"], s["scale_pow"])
    generated = encoders.first_stage.decode(diffusion.ddim_sample(fn, fixed["z"], steps=s["steps"],
                                                                  clip_denoised=s["clip_denoised"]))
    columns = [fixed["source"], fixed["target"], fixed["skeleton"] * 2 - 1, generated.cpu()]
    images = torch.stack(columns, dim=1).flatten(0, 1)
    return make_grid(((images + 1) / 2).clamp(0, 1), nrow=len(columns))


def fixed_samples(cfg, encoders, device):
    """The first held-out test pairs with their conditions, computed once."""
    test = PairDataset(cfg["data"]["root"], cfg["data"]["size"], "test")
    items = [test[i] for i in range(min(cfg["sample"]["num_pairs"], len(test)))]
    stack = lambda k: torch.stack([it[k] for it in items])
    g = torch.Generator(device).manual_seed(cfg["train"]["seed"])
    fs = encoders.first_stage
    source_latent = fs.sample_from_moments(*fs.moments(stack("source").to(device)), generator=g)
    return {"source": stack("source"), "target": stack("target"), "skeleton": stack("target_skeleton"),
            "pose": encoders.pose(stack("target_pose_dino").to(device)),
            "image": encoders.image(stack("source_dino").to(device)), "source_latent": source_latent,
            "z": torch.randn(source_latent.shape, generator=g, device=device)}


def train(cfg, out, resume=False):
    rank, world, device = setup_distributed()
    tc = cfg["train"]
    out = Path(out)
    ckpt_path = newest_checkpoint(out) if resume else None
    if rank == 0:
        if not resume and newest_checkpoint(out) is not None:
            raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue, or another --out")
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True) if ckpt_path else None
    if ckpt is not None:
        diffs = config_differences(ckpt["config"], cfg)
        if diffs:
            raise ValueError(f"{out} holds a run of another config; refusing to resume:\n  " + "\n  ".join(diffs))

    if tc["global_batch"] % (world * tc["grad_accum"]):
        raise ValueError(f"train.global_batch {tc['global_batch']} must be divisible by processes x grad_accum "
                         f"= {world} x {tc['grad_accum']}")
    micro = tc["global_batch"] // (world * tc["grad_accum"])
    seed = tc["seed"]
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    signature = encoder_signature(cfg["encoders"], cfg["data"]["size"])
    train_set = build_data(cfg, "train", signature)
    encoders = build_encoders(cfg["encoders"], device)
    model = XMDPT(**model_arch(cfg, encoders.pose_dim, encoders.image_dim)).to(device)
    fixed = fixed_samples(cfg, encoders, device) if rank == 0 and tc["sample_every"] else None
    if cfg["data"]["cache"]:
        encoders.pose = encoders.image = None
    ema = XMDPT(**model.arch).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
        states = ckpt["rng"]
        set_rng_state(states[rank] if len(states) == world else states[0])
    diffusion = Diffusion(prediction=model.arch["prediction"])
    objective = Objective(model, diffusion)
    wrapped = DistributedDataParallel(objective) if world > 1 else objective

    sampler = ResumableSampler(len(train_set), tc["global_batch"], seed, rank, world, start=step * tc["global_batch"])
    loader = DataLoader(SeededDataset(train_set), batch_size=micro, sampler=sampler,
                        num_workers=cfg["data"]["workers"], pin_memory=device.type == "cuda",
                        generator=torch.Generator(), persistent_workers=False)
    batches = iter(loader)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" and tc["mixed_precision"] == "bf16")

    log = writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        log = CSVLog(out / "log.csv", step)
        writer = SummaryWriter(out / "tensorboard")

    def save(at):
        states = [rng_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, rng_state())
        if rank == 0:
            atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "step": at, "config": cfg, "arch": model.arch, "rng": states},
                        out / "checkpoints" / f"{at:07d}.pt")

    bar = tqdm(total=tc["max_steps"], initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    sums, count, tic = {}, 0, time.time()
    try:
        while step < tc["max_steps"]:
            opt.zero_grad(set_to_none=True)
            terms_sum = {}
            for micro_step in range(tc["grad_accum"]):
                batch = next(batches)
                with torch.no_grad():
                    inputs = step_inputs(batch, encoders, device)
                sync = world == 1 or micro_step == tc["grad_accum"] - 1
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast:
                    terms = wrapped(*inputs)
                (terms["total"] / tc["grad_accum"]).backward()
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v.detach().float() / tc["grad_accum"]
            names = sorted(terms_sum)
            values = torch.stack([terms_sum[k] for k in names])
            if world > 1:
                dist.all_reduce(values)
                values /= world
            values = values.tolist()
            if not all(np.isfinite(values)):
                last = newest_checkpoint(out)
                raise FloatingPointError(f"non-finite loss at step {step + 1}; stopping. The last good checkpoint "
                                         f"is {last or 'none (no checkpoint written yet)'}")
            if tc["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            opt.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - tc["ema"])
            step += 1
            count += 1
            bar.update(1)
            for k, v in zip(names, values):
                sums[k] = sums.get(k, 0.0) + v
            if step % tc["log_every"] == 0 or step == tc["max_steps"]:
                means = {k: v / count for k, v in sums.items()}
                rate = count / (time.time() - tic)
                row = {"step": step, "loss": means["total"], "mse": means["mse"], "vb": means["vb"],
                       "m_loss": means.get("m_loss", ""), "m_mse": means.get("m_mse", ""),
                       "m_vb": means.get("m_vb", ""), "lr": opt.param_groups[0]["lr"], "steps_per_s": rate}
                if rank == 0:
                    log.write(row)
                    for k, v in row.items():
                        if k != "step" and v != "":
                            writer.add_scalar(f"train/{k}", v, step)
                    bar.set_postfix(loss=f"{means['total']:.4f}")
                sums, count, tic = {}, 0, time.time()
            if step % tc["ckpt_every"] == 0 or step == tc["max_steps"]:
                save(step)
            if rank == 0 and tc["sample_every"] and step % tc["sample_every"] == 0:
                from torchvision.utils import save_image
                grid = sample_grid(ema, diffusion, encoders, fixed, cfg)
                save_image(grid, out / "samples" / f"{step:07d}.png")
                writer.add_image("samples", grid, step)
    except KeyboardInterrupt:
        save(step)
        if rank == 0:
            print(f"\ninterrupted: saved the checkpoint of step {step} in {out / 'checkpoints'}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return model, ema


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--out", required=True, help="run directory: log.csv, tensorboard/, samples/, checkpoints/")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    parser.add_argument("--ckpt-every", type=int, help="write a checkpoint every N steps (train.ckpt_every)")
    parser.add_argument("--log-every", type=int, help="append a row to log.csv every N steps (train.log_every)")
    parser.add_argument("--sample-every", type=int,
                        help="save a grid of EMA samples on fixed test pairs every N steps; 0 = never")
    parser.add_argument("--seed", type=int, help="seed of the data order, augmentation and noise (train.seed)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=5e-5 model.mask_ratio=0.5")
    args = parser.parse_args(argv)
    flags = {"max_steps": args.max_steps, "ckpt_every": args.ckpt_every, "log_every": args.log_every,
             "sample_every": args.sample_every, "seed": args.seed}
    overrides = list(args.overrides) + [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    return args, load_config(args.config, overrides)


def main(argv=None):
    args, cfg = parse_args(argv)
    train(cfg, args.out, args.resume)


if __name__ == "__main__":
    main()
