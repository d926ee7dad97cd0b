"""Train X-MDPT on a DeepFashion-layout dataset, on one GPU, several (torchrun), or the CPU.

  python train_xmdpt.py --config configs/xmdpt_s.yaml --out runs/xmdpt_s [section.key=value ...]
  torchrun --nproc_per_node 2 train_xmdpt.py --config configs/xmdpt_l_512.yaml --out runs/l512

A step: a batch, its model inputs (the frozen encoders on the pixels, or a feature cache's entries), the
objective (models/objective.py), backward, clipping, the optimizer step and the EMA. The run directory holds
log.csv, TensorBoard events, sample grids and checkpoints (data/checkpoints.py); --resume continues from the
newest one exactly.

Ctrl-C, SIGTERM and SIGUSR1 stop the run at the end of the step in progress, with a checkpoint: exit status 130
after Ctrl-C, 75 after SIGTERM or SIGUSR1 (a cluster's preemption: resubmit with --resume). A second Ctrl-C
stops at once, without saving.
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
from data.checkpoints import discard_staged, newest_checkpoint, save_checkpoint
from data.deepfashion import PairDataset
from data.errors import InputError, OutputExistsError, reported
from data.sampler import ResumableSampler, SeededDataset, item_seed
from inference.pipeline import Pipeline, encode_pairs
from models import XMDPT
from models.checkpoint import read_checkpoint
from models.distributed import STOP_SIGNALS, StopSignals, barrier, ignore_stop_signals, setup_distributed, teardown
from models.encoders import build_encoders
from models.objective import build_objective

# Keys that may change between a run and its resumption.
RUN_KEYS = {"max_steps", "ckpt_every", "log_every", "sample_every", "workers", "keep_last", "keep_every", "compile"}
PROGRAM = "train_xmdpt.py"


def train(cfg, out, resume=False):
    """Train as `cfg` says into the run directory `out` (with `resume`, from its newest checkpoint); returns the
    trained model and its EMA."""
    tc, out, log = cfg["train"], Path(out), None
    rank, world, device = setup_distributed()
    try:
        # ------------------------------------------------------------------------------------------ setup
        if tc["global_batch"] % (world * tc["grad_accum"]):
            raise InputError(f"train.global_batch {tc['global_batch']} must be divisible by processes x "
                             f"grad_accum = {world} x {tc['grad_accum']}")
        if not (isinstance(tc["keep_last"], int) and tc["keep_last"] >= 1):
            raise InputError(f"train.keep_last must be a whole number >= 1, got {tc['keep_last']!r}")
        checkpoint = checkpoint_to_resume(cfg, out, resume, rank)
        if rank == 0:
            discard_staged(out)  # what a run killed in the middle of a save left behind
        torch.manual_seed(tc["seed"] + rank)
        np.random.seed(tc["seed"] + rank)
        random.seed(tc["seed"] + rank)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                  enabled=device.type == "cuda" and tc["mixed_precision"] == "bf16")

        # ------------------------------------------------------------------------------------------- data
        cached = cfg["data"]["cache"] is not None  # a feature cache: no encoder runs in a step
        train_set = training_data(cfg)
        encoders = build_encoders(cfg["encoders"], device)
        samples = sample_pairs(cfg, encoders, device) if rank == 0 and tc["sample_every"] else None
        if cached:
            encoders.pose = encoders.image = None  # the first stage stays: it samples latents from the cache

        # ---------------------------------------------------------------------------------- model and EMA
        model = XMDPT(model_config(cfg)).to(device)
        ema = XMDPT(model.config).to(device).eval().requires_grad_(False)
        ema.load_state_dict(model.state_dict())
        objective = build_objective(cfg, model, ema)
        if tc["compile"]:
            model.compile_denoiser()
        step_objective = DistributedDataParallel(objective) if world > 1 else objective

        # -------------------------------------------------------------------------------------- optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])

        # ----------------------------------------------------------------------------------------- resume
        step, sums = 0, LossSums(device)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            ema.load_state_dict(checkpoint["ema"])
            opt.load_state_dict(checkpoint["opt"])
            step = checkpoint["step"]
            processes = checkpoint.get("process") or [{"rng": state} for state in checkpoint["rng"]]  # or older
            process = processes[rank if len(processes) == world else 0]
            set_rng_state(process["rng"])
            if "log_sums" in process:
                sums.load(process["log_sums"])
        micro = tc["global_batch"] // (world * tc["grad_accum"])
        sampler = ResumableSampler(len(train_set), tc["global_batch"], tc["seed"], rank, world,
                                   start=step * tc["global_batch"])
        batches = iter(DataLoader(SeededDataset(train_set), batch_size=micro, sampler=sampler,
                                  num_workers=cfg["data"]["workers"], pin_memory=device.type == "cuda",
                                  generator=torch.Generator(), worker_init_fn=ignore_stop_signals))
        log = Log(out, objective.terms, step) if rank == 0 else None

        def save():
            """The checkpoint of this step, with every process's random states and unlogged loss sums."""
            sums.check_finite(world, out)
            processes = [{"rng": rng_state(), "log_sums": sums.state()}]
            if world > 1:
                processes = [None] * world
                dist.all_gather_object(processes, {"rng": rng_state(), "log_sums": sums.state()})
            if rank == 0:
                save_checkpoint(out, step, {"model": model.state_dict(), "ema": ema.state_dict(),
                                            "opt": opt.state_dict(), "step": step,
                                            "model_config": asdict(model.config), "run_config": cfg,
                                            "process": processes}, tc["keep_last"], tc["keep_every"])
            barrier()  # no process leaves before the checkpoint is written
            return step

        # ------------------------------------------------------------------------------------------- loop
        saved = step
        with StopSignals(world) as stop, tqdm(total=tc["max_steps"], initial=step, disable=rank != 0, desc="train",
                                             dynamic_ncols=True) as bar:
            while step < tc["max_steps"]:
                opt.zero_grad(set_to_none=True)
                for micro_step in range(tc["grad_accum"]):
                    batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()
                             if torch.is_tensor(v)}
                    x0, cond = encoders.training_inputs(batch, cached)
                    last = world == 1 or micro_step == tc["grad_accum"] - 1  # DDP averages gradients here
                    with (contextlib.nullcontext() if last else step_objective.no_sync()), autocast:
                        terms = step_objective(x0, cond)
                    (terms["total"] / tc["grad_accum"]).backward()
                    sums.add(terms, 1 / tc["grad_accum"], step + 1)
                if tc["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
                opt.step()
                update_ema(ema, model, tc["ema"])
                step += 1
                bar.update(1)
                if step % tc["log_every"] == 0 or step == tc["max_steps"]:
                    sums.check_finite(world, out)
                    means, rate = sums.take(world)
                    if log is not None:
                        log.write(step, means, opt.param_groups[0]["lr"], rate)
                        bar.set_postfix(loss=f"{means['total']:.4f}")
                if step % tc["ckpt_every"] == 0 or step == tc["max_steps"]:
                    saved = save()
                if samples is not None and step % tc["sample_every"] == 0:
                    write_samples(out, step, Pipeline(ema, encoders, cfg["data"]["size"], cfg["sample"], device),
                                  samples, log)
                signal = stop.requested()
                if signal is not None:
                    saved = save() if saved != step else saved
                    bar.close()  # so that the message below stands on a line of its own
                    if rank == 0:
                        print(f"{PROGRAM}: stopped by {signal.name} at step {step}, with its checkpoint "
                              f"{newest_checkpoint(out)}; continue with --resume", file=sys.stderr)
                    raise SystemExit(STOP_SIGNALS[signal])
        return model, ema
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"{PROGRAM}: stopped at once, without saving; the newest checkpoint is "
              f"{newest_checkpoint(out) or 'none'}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if log is not None:
            log.close()
        teardown()


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


# ------------------------------------------------------------------------------------------------- data

def training_data(cfg):
    """The training pairs: pixels, or the feature cache's entries for them (data.cache)."""
    d = cfg["data"]
    pairs = PairDataset(d["root"], d["size"], "train", scale_jitter=d["scale_jitter"])
    if d["cache"] is None:
        return pairs
    return CachedPairs(pairs, FeatureCache(d["cache"], encoder_signature(cfg["encoders"], d["size"])))


def sample_pairs(cfg, encoders, device):
    """The first `sample.num_pairs` test pairs, for the sample grids: their images and skeletons, and their model
    inputs with each pair's noise."""
    test = PairDataset(cfg["data"]["root"], cfg["data"]["size"], "test")
    items = [test[i] for i in range(min(cfg["sample"]["num_pairs"], len(test)))]
    images = {k: torch.stack([it[k] for it in items]) for k in ("source", "target", "target_skeleton")}
    seeds = [item_seed(cfg["train"]["seed"], i) for i in range(len(items))]
    return dict(images, inputs=encode_pairs(encoders, images["source"], images["target_skeleton"], seeds, device))


@torch.no_grad()
def write_samples(out, step, pipe, samples, log):
    """source | target | skeleton | generated (EMA weights), one row per sample pair, as a PNG and in TensorBoard."""
    from torchvision.utils import make_grid, save_image
    columns = [samples["source"], samples["target"], samples["target_skeleton"] * 2 - 1, pipe.sample(samples["inputs"])]
    grid = make_grid(((torch.stack(columns, dim=1).flatten(0, 1) + 1) / 2).clamp(0, 1), nrow=len(columns))
    save_image(grid, Path(out) / "samples" / f"{step:07d}.png")
    log.tensorboard.add_image("samples", grid, step)


# ----------------------------------------------------------------------------------------- checkpoints

def checkpoint_to_resume(cfg, out, resume, rank):
    """The contents of the newest checkpoint in `out` when resuming (refused if it holds another config), else
    None (refused if `out` already holds checkpoints)."""
    newest = newest_checkpoint(out)
    if not resume:
        if newest is not None and rank == 0:
            raise OutputExistsError(f"{out} already holds checkpoints; pass --resume to continue, or another --out")
        return None
    if newest is None:
        return None
    contents = read_checkpoint(newest).contents
    diffs = config_differences(contents["run_config"], cfg)
    if diffs:
        raise InputError(f"{out} holds a run of another config; refusing to resume:\n  " + "\n  ".join(diffs))
    return contents


def config_differences(saved, current, prefix=""):
    """The keys in which two configs differ, as 'key: a in the run, b now' lines (RUN_KEYS may differ)."""
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
    """This process's random states (torch, Python, NumPy and CUDA), as tensors and numbers torch.save keeps."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore the random states `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------------------- log

class LossSums:
    """The loss terms summed on the device between log rows, and the first step whose total was not finite,
    so that a step never waits for the device."""

    def __init__(self, device):
        self.device, self.sums, self.count = device, {}, 0
        self.first_bad = torch.full((), np.iinfo(np.int64).max, dtype=torch.int64, device=device)
        self.tic = time.time()

    def add(self, terms, weight, step):
        """Add a micro-batch's terms, weighted (1 / grad_accum), and note `step` if its total is not finite."""
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().double() * weight
        bad = ~torch.isfinite(terms["total"].detach())
        self.first_bad = torch.where(bad, self.first_bad.clamp(max=step), self.first_bad)
        self.count += weight

    def check_finite(self, world, out):
        """Stop, naming the first step whose loss was not finite, before anything logs or saves it."""
        first = self.first_bad.clone()
        if world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != np.iinfo(np.int64).max:
            last = newest_checkpoint(out)
            raise FloatingPointError(f"non-finite loss at step {first.item()}; stopping. The last good checkpoint "
                                     f"is {last or 'none (no checkpoint written yet)'}")

    def state(self):
        """The sums not yet logged, to resume with (a checkpoint between log rows keeps them)."""
        return {"sums": {name: value.cpu() for name, value in self.sums.items()}, "count": self.count,
                "first_bad": self.first_bad.cpu()}

    def load(self, state):
        """Take up the sums a checkpoint kept."""
        self.sums = {name: value.to(self.device) for name, value in state["sums"].items()}
        self.count, self.first_bad = state["count"], state["first_bad"].to(self.device)

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
    """log.csv (the step, the objective's terms, lr, steps/s; on resume, rows after the resumed step are dropped)
    and TensorBoard events."""

    def __init__(self, out, terms, resume_step):
        from torch.utils.tensorboard import SummaryWriter
        self.path = Path(out) / "log.csv"
        self.columns = ["step", *terms, "lr", "steps_per_s"]
        for folder in ("checkpoints", "samples"):
            (Path(out) / folder).mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = SummaryWriter(Path(out) / "tensorboard")

    def write(self, step, means, lr, rate):
        """Append a row to log.csv and its scalars to TensorBoard."""
        row = {"step": step, **means, "lr": lr, "steps_per_s": rate}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        for key, value in row.items():
            if key != "step":
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def close(self):
        """Flush and close the TensorBoard events."""
        self.tensorboard.close()


def parse_args(argv=None):
    """The command line, with the flags that stand for train.* keys turned into overrides."""
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the trained model's denoiser (train.compile; in a distillation, the "
                             "student's only): faster steps once the first has compiled")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error in the input (a file, a key), not one line")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=5e-5 model.mask_ratio=0.5")
    args = parser.parse_args(argv)
    flags = {"max_steps": args.max_steps, "ckpt_every": args.ckpt_every, "log_every": args.log_every,
             "sample_every": args.sample_every, "seed": args.seed, "compile": args.compile or None}
    args.overrides = list(args.overrides) + [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    return args


def main(argv=None):
    """Train as the command line says; a user error ends in one line and exit status 2."""
    args = parse_args(argv)
    with reported("train_xmdpt.py", args.debug):
        train(load_config(args.config, args.overrides), args.out, args.resume)


if __name__ == "__main__":
    main()
