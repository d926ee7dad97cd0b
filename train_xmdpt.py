"""Train X-MDPT on a DeepFashion-layout dataset, on one GPU, several (torchrun), or the CPU.

  python train_xmdpt.py --config configs/xmdpt_s.yaml --out runs/xmdpt_s [section.key=value ...]
  torchrun --nproc_per_node 2 train_xmdpt.py --config configs/xmdpt_l_512.yaml --out runs/l512

Each step sums the hybrid loss of an unmasked forward and (with MIPNet) of a masked forward on the same
x_t, t and noise (models/training.py). The frozen encoders run only on what the step uses (the target's
skeleton, the source image, both latents), or not at all with a feature cache (data.cache). The run directory
holds log.csv, TensorBoard events, sample grids and atomic checkpoints; --resume continues from the newest one
exactly.
"""
import argparse
import contextlib
import csv
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from configs import load_config, model_config
from data.cache import CachedPairs, FeatureCache, encoder_signature
from data.deepfashion import PairDataset
from data.files import atomic_path
from data.sampler import ResumableSampler, SeededDataset
from inference.pipeline import Pipeline, encode_pairs
from inference.distributed import setup_distributed, teardown
from inference.pairs import pair_seed
from models import XMDPT, Diffusion
from models.checkpoint import read_checkpoint
from models.encoders import build_encoders
from models.training import Objective, step_inputs, update_ema

# Keys that may change between a run and its resumption.
RUN_KEYS = {"max_steps", "ckpt_every", "log_every", "sample_every", "workers"}
# The loss terms (models/training.py), means over the global batch; masked_* are absent without MIPNet.
LOSSES = ["total", "plain_loss", "plain_mse", "plain_vb", "masked_loss", "masked_mse", "masked_vb"]
LOG_COLUMNS = ["step", *LOSSES, "lr", "steps_per_s"]


def train(cfg, out, resume=False):
    """Train as `cfg` says into the run directory `out` (with `resume`, from its newest checkpoint); returns the
    trained model and its EMA."""
    rank, world, device = setup_distributed()
    try:
        checkpoint = checkpoint_to_resume(cfg, out, resume, rank)
        run = Run(cfg, out, checkpoint, rank, world, device)
        run.loop()
        return run.model, run.ema
    finally:
        teardown()


# ------------------------------------------------------------------------------------------------- resume

def newest_checkpoint(out):
    ckpts = sorted((Path(out) / "checkpoints").glob("*.pt"))
    return ckpts[-1] if ckpts else None


def checkpoint_to_resume(cfg, out, resume, rank):
    """The contents of the newest checkpoint in `out` when resuming (refused if it holds another config), else
    None (refused if `out` already holds checkpoints)."""
    newest = newest_checkpoint(out)
    if not resume:
        if newest is not None and rank == 0:
            raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue, or another --out")
        return None
    if newest is None:
        return None
    contents = read_checkpoint(newest).contents
    diffs = config_differences(contents["run_config"], cfg)
    if diffs:
        raise ValueError(f"{out} holds a run of another config; refusing to resume:\n  " + "\n  ".join(diffs))
    return contents


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


# -------------------------------------------------------------------------------------------------- build

def training_data(cfg, signature):
    """The training pairs: pixels, or the feature cache's entries for them."""
    d = cfg["data"]
    pairs = PairDataset(d["root"], d["size"], "train", scale_jitter=d["scale_jitter"])
    return CachedPairs(pairs, FeatureCache(d["cache"], signature)) if d["cache"] else pairs


def frozen_encoders(cfg, device, sample_pairs):
    """The frozen encoders, and the model inputs of the first `sample_pairs` test pairs (the sample grid's,
    with their images and skeletons). With a feature cache a step runs no encoder: the DINOv2 encoders are
    released once the sample grid's inputs are made; the first stage stays, to turn cached moments into
    latents and decode the samples."""
    encoders = build_encoders(cfg["encoders"], device)
    samples = None
    if sample_pairs:
        test = PairDataset(cfg["data"]["root"], cfg["data"]["size"], "test")
        items = [test[i] for i in range(min(sample_pairs, len(test)))]
        images = {k: torch.stack([it[k] for it in items]) for k in ("source", "target", "target_skeleton")}
        seeds = [pair_seed(cfg["train"]["seed"], i) for i in range(len(items))]
        samples = dict(images, inputs=encode_pairs(encoders, images["source"], images["target_skeleton"], seeds,
                                                   device))
    if cfg["data"]["cache"]:
        encoders.pose = encoders.image = None
    return encoders, samples


class Run:
    """A training run, built from a config and the checkpoint it resumes (or None)."""

    def __init__(self, cfg, out, checkpoint, rank, world, device):
        self.cfg, self.tc, self.out = cfg, cfg["train"], Path(out)
        self.rank, self.world, self.device = rank, world, device
        tc = self.tc
        if tc["global_batch"] % (world * tc["grad_accum"]):
            raise ValueError(f"train.global_batch {tc['global_batch']} must be divisible by processes x grad_accum "
                             f"= {world} x {tc['grad_accum']}")
        torch.manual_seed(tc["seed"] + rank)
        np.random.seed(tc["seed"] + rank)
        random.seed(tc["seed"] + rank)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        train_set = training_data(cfg, encoder_signature(cfg["encoders"], cfg["data"]["size"]))
        sample_pairs = cfg["sample"]["num_pairs"] if rank == 0 and tc["sample_every"] else 0
        self.encoders, self.samples = frozen_encoders(cfg, device, sample_pairs)
        self.model = XMDPT(model_config(cfg)).to(device)
        self.ema = XMDPT(self.model.config).to(device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
        self.step = 0
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.ema.load_state_dict(checkpoint["ema"])
            self.opt.load_state_dict(checkpoint["opt"])
            self.step = checkpoint["step"]
            states = checkpoint["rng"]
            set_rng_state(states[rank] if len(states) == world else states[0])
        objective = Objective(self.model, Diffusion())
        self.objective = DistributedDataParallel(objective) if world > 1 else objective

        micro = tc["global_batch"] // (world * tc["grad_accum"])
        sampler = ResumableSampler(len(train_set), tc["global_batch"], tc["seed"], rank, world,
                                   start=self.step * tc["global_batch"])
        self.batches = iter(DataLoader(SeededDataset(train_set), batch_size=micro, sampler=sampler,
                                       num_workers=cfg["data"]["workers"], pin_memory=device.type == "cuda",
                                       generator=torch.Generator(), persistent_workers=False))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=device.type == "cuda" and tc["mixed_precision"] == "bf16")
        self.log = Log(self.out, self.step) if rank == 0 else None
        if rank == 0:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.out / "samples").mkdir(exist_ok=True)
        self.sums = LossSums(device)

    # --------------------------------------------------------------------------------------------- loop

    def loop(self):
        tc = self.tc
        bar = tqdm(total=tc["max_steps"], initial=self.step, disable=self.rank != 0, desc="train", dynamic_ncols=True)
        try:
            while self.step < tc["max_steps"]:
                self.train_step()
                self.step += 1
                bar.update(1)
                if self.step % tc["log_every"] == 0 or self.step == tc["max_steps"]:
                    self.write_log(bar)
                if self.step % tc["ckpt_every"] == 0 or self.step == tc["max_steps"]:
                    self.save()
                if self.rank == 0 and tc["sample_every"] and self.step % tc["sample_every"] == 0:
                    self.write_samples()
        except KeyboardInterrupt:
            self.save()
            if self.rank == 0:
                print(f"\ninterrupted: saved the checkpoint of step {self.step} in {self.out / 'checkpoints'}",
                      file=sys.stderr)
            raise SystemExit(130)
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()

    def train_step(self):
        """One optimizer step over grad_accum micro-batches, with no host-device synchronisation."""
        tc = self.tc
        self.opt.zero_grad(set_to_none=True)
        for micro_step in range(tc["grad_accum"]):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(self.batches).items()
                     if torch.is_tensor(v)}
            features = batch if "pose" in batch else \
                self.encoders.features(batch["target"], batch["source"], batch["target_skeleton"])
            inputs = step_inputs(features, self.encoders.first_stage)
            sync = self.world == 1 or micro_step == tc["grad_accum"] - 1
            with (contextlib.nullcontext() if sync else self.objective.no_sync()), self.autocast:
                terms = self.objective(*inputs)
            (terms["total"] / tc["grad_accum"]).backward()
            self.sums.add(terms, 1 / tc["grad_accum"], self.step + 1)
        if tc["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc["grad_clip"])
        self.opt.step()
        update_ema(self.ema, self.model, tc["ema"])

    # ----------------------------------------------------------------------------------------- log, save

    def check_finite(self):
        """Stop, naming the first step whose loss was not finite, before anything logs or saves it."""
        bad = self.sums.first_bad_step(self.world)
        if bad is not None:
            last = newest_checkpoint(self.out)
            raise FloatingPointError(f"non-finite loss at step {bad}; stopping. The last good checkpoint is "
                                     f"{last or 'none (no checkpoint written yet)'}")

    def write_log(self, bar):
        self.check_finite()
        means, rate = self.sums.take(self.world)
        if self.log is not None:
            self.log.write(self.step, means, self.opt.param_groups[0]["lr"], rate)
            bar.set_postfix(loss=f"{means['total']:.4f}")

    def save(self):
        self.check_finite()
        states = [rng_state()]
        if self.world > 1:
            states = [None] * self.world
            dist.all_gather_object(states, rng_state())
        if self.rank == 0:
            contents = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                        "step": self.step, "model_config": asdict(self.model.config), "run_config": self.cfg,
                        "rng": states}
            with atomic_path(self.out / "checkpoints" / f"{self.step:07d}.pt") as staged:
                torch.save(contents, staged)

    @torch.no_grad()
    def write_samples(self):
        """source | target | skeleton | generated (EMA weights), one row per sample pair, in [0, 1]."""
        from torchvision.utils import make_grid, save_image
        s, cfg = self.samples, self.cfg["sample"]
        pipe = Pipeline(self.ema, self.encoders, self.cfg["data"]["size"], cfg, self.device)
        generated = pipe.sample(s["inputs"])
        columns = [s["source"], s["target"], s["target_skeleton"] * 2 - 1, generated]
        grid = make_grid(((torch.stack(columns, dim=1).flatten(0, 1) + 1) / 2).clamp(0, 1), nrow=len(columns))
        save_image(grid, self.out / "samples" / f"{self.step:07d}.png")
        self.log.tensorboard.add_image("samples", grid, self.step)


class LossSums:
    """The loss terms summed on the device between log rows, and the first step whose total was not finite,
    so that a step never waits for the device."""

    def __init__(self, device):
        self.device, self.sums, self.count = device, {}, 0
        self.first_bad = torch.full((), np.iinfo(np.int64).max, dtype=torch.int64, device=device)
        self.tic = time.time()

    def add(self, terms, weight, step):
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().double() * weight
        bad = ~torch.isfinite(terms["total"].detach())
        self.first_bad = torch.where(bad, self.first_bad.clamp(max=step), self.first_bad)
        self.count += weight

    def first_bad_step(self, world):
        first = self.first_bad.clone()
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = first.item()
        return None if first == np.iinfo(np.int64).max else first

    def take(self, world):
        """(mean of each term over the steps since the last call and over the processes, steps per second)."""
        names = sorted(self.sums)
        values = torch.stack([self.sums[name] for name in names])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        means = dict(zip(names, (values / round(self.count)).tolist()))
        rate = round(self.count) / (time.time() - self.tic)
        self.sums, self.count, self.tic = {}, 0, time.time()
        return means, rate


class Log:
    """log.csv (LOG_COLUMNS; on resume, rows after the resumed step are dropped) and TensorBoard events."""

    def __init__(self, out, resume_step):
        from torch.utils.tensorboard import SummaryWriter
        self.path = Path(out) / "log.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = SummaryWriter(Path(out) / "tensorboard")

    def write(self, step, means, lr, rate):
        row = {"step": step, **{name: means.get(name, "") for name in LOSSES}, "lr": lr, "steps_per_s": rate}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(row)
        for key, value in row.items():
            if key != "step" and value != "":
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def close(self):
        self.tensorboard.close()


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
