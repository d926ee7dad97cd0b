"""A training run's log: the loss terms summed on the device between rows, log.csv and TensorBoard, and the sample
grids of fixed test pairs drawn with the EMA weights."""
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from data.deepfashion import PairDataset
from data.sampler import item_seed
from inference.pipeline import encode_pairs

from .checkpoints import newest_checkpoint


class LossSums:
    """The loss terms summed on the device between log rows, and the first step whose total was not finite,
    so that a step never waits for the device. A term an objective does not return at every step (a distillation
    that updates its student every few steps) is averaged over the steps that returned it."""

    def __init__(self, device):
        self.device, self.sums, self.counts = device, {}, {}
        self.first_bad = torch.full((), np.iinfo(np.int64).max, dtype=torch.int64, device=device)
        self.tic = time.time()

    def add(self, terms, weight, step):
        """Add a micro-batch's terms, weighted (1 / grad_accum), and note `step` if its total is not finite."""
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0) + value.detach().double() * weight
            self.counts[name] = self.counts.get(name, 0) + weight
        bad = ~torch.isfinite(terms["total"].detach())
        self.first_bad = torch.where(bad, self.first_bad.clamp(max=step), self.first_bad)

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
        return {"sums": {name: value.cpu() for name, value in self.sums.items()}, "counts": dict(self.counts),
                "first_bad": self.first_bad.cpu()}

    def load(self, state):
        """Take up the sums a checkpoint kept."""
        self.sums = {name: value.to(self.device) for name, value in state["sums"].items()}
        counts = state["counts"] if "counts" in state else dict.fromkeys(state["sums"], state["count"])  # or older
        self.counts, self.first_bad = dict(counts), state["first_bad"].to(self.device)

    def take(self, world):
        """(mean of each term over the steps since the last call that returned it and over the processes, steps
        per second)."""
        names = sorted(self.sums)
        values = torch.stack([self.sums[name] for name in names])
        if world > 1:
            dist.all_reduce(values)
            values /= world
        means = {name: value / round(self.counts[name]) for name, value in zip(names, values.tolist())}
        rate = round(self.counts["total"]) / (time.time() - self.tic)
        self.sums, self.counts, self.tic = {}, {}, time.time()
        return means, rate


class Log:
    """log.csv (the step, the objective's terms, lr, steps/s; on resume, rows after the resumed step are dropped;
    a term not returned since the last row is left empty) and TensorBoard events."""

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


class SampleGrids:
    """The first `sample.num_pairs` test pairs, encoded once with each pair's noise; `write` draws source | target |
    skeleton | generated, one row per pair, as samples/{step}.png and in TensorBoard."""

    def __init__(self, cfg, encoders, device):
        test = PairDataset(cfg["data"]["root"], cfg["data"]["size"], "test")
        count = min(cfg["sample"]["num_pairs"], len(test))
        self.images = default_collate([test[i] for i in range(count)])
        seeds = [item_seed(cfg["train"]["seed"], i) for i in range(count)]
        self.inputs = encode_pairs(encoders, self.images["source"], self.images["target_skeleton"], seeds, device)

    @torch.no_grad()
    def write(self, out, step, pipe, log):
        """The grid of `pipe`'s images (the EMA weights) at `step`."""
        from torchvision.utils import make_grid, save_image
        generated = pipe.decode(pipe.sample(self.inputs))
        columns = [self.images["source"], self.images["target"], self.images["target_skeleton"] * 2 - 1, generated]
        grid = make_grid(((torch.stack(columns, dim=1).flatten(0, 1) + 1) / 2).clamp(0, 1), nrow=len(columns))
        save_image(grid, Path(out) / "samples" / f"{step:07d}.png")
        log.tensorboard.add_image("samples", grid, step)
