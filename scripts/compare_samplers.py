"""Few-step sampling against the teacher, in one run on the same test pairs and the same noise.

  python -m scripts.compare_samplers                                   # the demo model and its 4-step student
  python -m scripts.compare_samplers --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt \\
      --student-config configs/distill_s.yaml --student-ckpt runs/distill_s/export --data datasets/deepfashion

Rows: the teacher with DDIM and DPM-Solver++ at several step counts, the consistency student at 1-8 steps.
Columns: network evaluations per image (a guided step costs two, a student's step one), SSIM and PSNR against
the targets, PSNR against the teacher's DDIM-50 image from the same noise, sharpness (the mean variance of the
Laplacian of the grey image; the targets' is printed for reference), and the sampling wall time per image
(encoders and decoding excluded, they are the same for every row). Writes the table to <out>/samplers.md and a
grid of the first pairs to <out>/samplers.png: source | target | one column per row of --grid.
"""
import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from configs import load_config
from data.deepfashion import PairDataset
from data.images import grid_row, to_uint8
from data.sampler import item_seed
from devices import default_device
from eval.metrics import psnr, ssim
from inference.pipeline import FAST_DEMO_CHECKPOINT, FAST_DEMO_CONFIG, Pipeline, model_files
from measure.timing import sync


def sharpness(rgb):
    """The variance of the Laplacian of a uint8 RGB image's grey version: higher is sharper."""
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def compare(teacher, student, pairs, rows, seed=0, batch_size=16):
    """{row: (images (N, 3, S, S), sampling seconds)} for rows (name, pipeline, sampler, steps), every pair's
    noise from item_seed(seed, i). Each row runs once untimed on the first batch before it is timed."""
    images = {row: [] for row in rows}
    seconds = dict.fromkeys(rows, 0.0)
    for start in tqdm(range(0, len(pairs), batch_size), desc="pairs", unit="batch"):
        items = default_collate(pairs[start:start + batch_size])
        seeds = [item_seed(seed, i) for i in range(start, start + len(items["name"]))]
        inputs = teacher.encode(items["source"], items["target_skeleton"], seeds)
        for row in rows:
            _, pipe, sampler, steps = row
            settings = pipe.settings(sampler=sampler, steps=steps)
            if start == 0:
                pipe.sample(inputs, settings=settings)  # untimed warm-up: CUDA start-up, compilation
            sync(teacher.device)
            tic = time.perf_counter()
            latents = pipe.sample(inputs, settings=settings)
            sync(teacher.device)
            seconds[row] += time.perf_counter() - tic
            images[row].append(pipe.decode(latents))
    return {row: (torch.cat(images[row]), seconds[row]) for row in rows}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the teacher's config (default: the demo's)")
    p.add_argument("--ckpt", help="the teacher's weights (default: the bundled demo model)")
    p.add_argument("--student-config", default=str(FAST_DEMO_CONFIG), help="the student's config")
    p.add_argument("--student-ckpt", default=str(FAST_DEMO_CHECKPOINT), help="the student's weights")
    p.add_argument("--data", help="dataset root (default: the teacher config's data.root)")
    p.add_argument("--limit", type=int, help="only the first N test pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs sampled together")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (pair i: item_seed(seed, i))")
    p.add_argument("--ddim", type=int, nargs="+", default=[50, 20, 10],
                   help="the teacher's DDIM step counts; the first is the reference of 'PSNR vs teacher'")
    p.add_argument("--dpm", type=int, nargs="*", default=[20, 10, 5], help="the teacher's DPM-Solver++ step counts")
    p.add_argument("--student", type=int, nargs="*", default=[1, 2, 4, 8], help="the student's step counts")
    p.add_argument("--grid", nargs="*", default=["ddim 50", "dpm++ 10", "lcm 4"],
                   help="the rows shown in the grid, as 'sampler steps'")
    p.add_argument("--grid-pairs", type=int, default=8, help="pairs in the grid")
    p.add_argument("--out", default="outputs/samplers", help="folder of samplers.md and samplers.png")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--compile", action="store_true", help="compile both denoisers with torch.compile")
    args = p.parse_args(argv)
    measured = [f"ddim {n}" for n in args.ddim] + [f"dpm++ {n}" for n in args.dpm] + [f"lcm {n}" for n in args.student]
    for name in args.grid:
        if name not in measured:
            p.error(f"--grid {name!r} is not a measured row; the rows are {', '.join(measured)}")
    args.config, args.ckpt = model_files(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    cfg = load_config(args.config)
    teacher = Pipeline.from_config(cfg, args.ckpt, device, args.compile)
    student = Pipeline.from_config(args.student_config, args.student_ckpt, device, args.compile, teacher.encoders)
    pairs = PairDataset(args.data or cfg["data"]["root"], teacher.size, "test")
    pairs = [pairs[i] for i in range(min(args.limit or len(pairs), len(pairs)))]
    rows = ([("teacher", teacher, "ddim", n) for n in args.ddim] + [("teacher", teacher, "dpm++", n) for n in args.dpm]
            + [("student", student, "lcm", n) for n in args.student])
    results = compare(teacher, student, pairs, rows, args.seed, args.batch_size)
    targets = [to_uint8(p["target"]) for p in pairs]
    reference = [to_uint8(x) for x in results[rows[0]][0]]
    lines = [f"{len(pairs)} test pairs, {device}, {torch.get_num_threads()} threads; targets' sharpness "
             f"{np.mean([sharpness(t) for t in targets]):.0f}", "",
             "| model | sampler | steps | evaluations / image | SSIM | PSNR (dB) | PSNR vs teacher DDIM-"
             f"{args.ddim[0]} (dB) | sharpness | sampling s / image |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        who, _, sampler, steps = row
        images = [to_uint8(x) for x in results[row][0]]
        evaluations = steps if sampler == "lcm" else 2 * steps
        versus = "-" if row == rows[0] else f"{np.mean([psnr(r, g) for r, g in zip(reference, images)]):.2f}"
        lines.append(f"| {who} | {sampler} | {steps} | {evaluations} | "
                     f"{np.mean([ssim(t, g) for t, g in zip(targets, images)]):.4f} | "
                     f"{np.mean([psnr(t, g) for t, g in zip(targets, images)]):.2f} | {versus} | "
                     f"{np.mean([sharpness(g) for g in images]):.0f} | {results[row][1] / len(pairs):.4f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shown = [next(r for r in rows if f"{r[2]} {r[3]}" == name) for name in args.grid]
    grid = torch.cat([grid_row(p["source"], p["target"], *(results[r][0][i] for r in shown))
                      for i, p in enumerate(pairs[:args.grid_pairs])], dim=1)
    cv2.imwrite(str(out / "samplers.png"), to_uint8(grid)[..., ::-1])
    print(f"wrote {out / 'samplers.md'} and {out / 'samplers.png'} (source | target | {' | '.join(args.grid)})")


if __name__ == "__main__":
    main()
