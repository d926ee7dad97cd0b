"""Train X-MDPT on a DeepFashion-layout dataset, on one GPU, several (torchrun), or the CPU.

  python train_xmdpt.py --config configs/xmdpt_s.yaml --out runs/xmdpt_s [section.key=value ...]
  torchrun --nproc_per_node 2 train_xmdpt.py --config configs/xmdpt_l_512.yaml --out runs/l512

A step: a batch, its model inputs (the frozen encoders on the pixels, or a feature cache's entries), the
objective (models/objective.py), backward, clipping, the optimizer step and the EMA. The run directory holds
log.csv, TensorBoard events, sample grids and checkpoints (training/); --resume continues from the newest one
exactly.

Ctrl-C, SIGTERM and SIGUSR1 stop the run at the end of the step in progress, with a checkpoint: exit status 130
after Ctrl-C, 75 after SIGTERM or SIGUSR1 (a cluster's preemption: resubmit with --resume). A second Ctrl-C
stops at once, without saving.
"""
import argparse
import contextlib
import random
import sys
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
from data.errors import InputError, reported
from data.sampler import ResumableSampler, SeededDataset
from devices import autocast, barrier, setup_distributed, teardown
from inference.pipeline import Pipeline
from models import XMDPT
from models.encoders import build_encoders
from training.checkpoints import (checkpoint_to_resume, discard_staged, newest_checkpoint, rng_state, save_checkpoint,
                                  set_rng_state)
from training.log import Log, LossSums, SampleGrids
from training.recipes import build_objective
from training.signals import STOP_SIGNALS, StopSignals, ignore_stop_signals

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

        # ------------------------------------------------------------------------------------------- data
        cached = cfg["data"]["cache"] is not None  # a feature cache: no encoder runs in a step
        train_set = training_data(cfg)
        encoders = build_encoders(cfg["encoders"], device)
        samples = SampleGrids(cfg, encoders, device) if rank == 0 and tc["sample_every"] else None
        if cached:
            encoders.pose = encoders.image = None  # the first stage stays: it samples latents from the cache

        # ---------------------------------------------------------------------------------- model and EMA
        model = XMDPT(model_config(cfg)).to(device)
        ema = XMDPT(model.config).to(device).eval().requires_grad_(False)
        objective = build_objective(cfg, model, ema)  # a distillation starts the model from its teacher here
        ema.load_state_dict(model.state_dict())
        if tc["compile"]:
            model.compile_denoiser()
        step_objective = DistributedDataParallel(objective, find_unused_parameters=objective.alternating) \
            if world > 1 else objective

        # -------------------------------------------------------------------------------------- optimizer
        opt = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])

        # ----------------------------------------------------------------------------------------- resume
        step, sums = 0, LossSums(device)
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            ema.load_state_dict(checkpoint["ema"])
            opt.load_state_dict(checkpoint["opt"])
            objective.load_run_state(checkpoint.get("objective", {}))
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
                                            "opt": opt.state_dict(), "objective": objective.run_state(),
                                            "step": step, "model_config": asdict(model.config), "run_config": cfg,
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
                    with (contextlib.nullcontext() if last else step_objective.no_sync()), \
                            autocast(device, tc["mixed_precision"] == "bf16"):
                        terms = step_objective(x0, cond)
                    (terms["total"] / tc["grad_accum"]).backward()
                    sums.add(terms, 1 / tc["grad_accum"], step + 1)
                if tc["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
                opt.step()
                objective.update()  # the objective's own networks, if it trains any
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
                    samples.write(out, step, Pipeline(ema, encoders, cfg["data"]["size"], cfg["sample"], device), log)
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
