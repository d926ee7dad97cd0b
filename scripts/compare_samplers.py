"""Few-step sampling against the teacher, in one run on the same test pairs and the same noise, over several seeds.

  python -m scripts.compare_samplers                                   # the demo model and its 4-step student
  python -m scripts.compare_samplers --curve "consistency 500=runs/distill_demo/student" ...
  python -m scripts.compare_samplers --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt \\
      --student-config configs/dmd2_s.yaml --student-ckpt runs/dmd2_s/export --data datasets/deepfashion \\
      --limit 1000

Rows: the teacher with DDIM and DPM-Solver++ at several step counts, the student at 1-8 steps, and other students
of the student's architecture (--curve NAME=CHECKPOINT: a distillation's checkpoints, say) at --curve-steps.
Columns: network evaluations per image (a guided step costs two, a student's step one); SSIM and PSNR against the
targets; PSNR against the teacher's first DDIM row from the same noise; sharpness (the mean variance of the
Laplacian of the grey image; the targets' is printed for reference); SWD, the sliced Wasserstein distance of the
images' Laplacian-pyramid patches to the targets' (eval/metrics.py `swd`, mean over the levels, in thousandths:
blur and grain both raise it); KID against the targets when the Inception weights are there (DeepFashion runs;
--inception, or torchvision's file in $TORCH_HOME); and the sampling wall time per image (encoders and decoding
excluded, they are the same for every row). Every figure is the mean over --seeds, with the standard deviation
over them. Writes <out>/samplers.md (the table), <out>/samplers.png (a grid of the first pairs, first seed:
source | target | one column per --grid row) and <out>/plane.png (every row on the SSIM-sharpness plane).
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
from data.errors import reported
from data.files import atomic_path
from data.images import grid_row, save_png, to_uint8
from data.sampler import item_seed
from devices import default_device
from eval.metrics import INCEPTION_FILE, InceptionFeatures, build_inception, fid_input, kid, psnr, ssim, swd
from inference.pipeline import FAST_DEMO_CHECKPOINT, FAST_DEMO_CONFIG, Pipeline, model_files
from measure.timing import sync


def sharpness(rgb):
    """The variance of the Laplacian of a uint8 RGB image's grey version: higher is sharper."""
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def generate(rows, pairs, seed, batch_size=16):
    """{row: (images (N, 3, S, S), sampling seconds)} for rows (model, pipeline, sampler, steps), every pair's noise
    from item_seed(seed, i), the pairs encoded once by the first row's pipeline (all share the encoders). Each row
    runs once untimed on the first batch before it is timed."""
    images = {row: [] for row in rows}
    seconds = dict.fromkeys(rows, 0.0)
    first = rows[0][1]
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"seed {seed}", unit="batch"):
        items = default_collate(pairs[start:start + batch_size])
        seeds = [item_seed(seed, i) for i in range(start, start + len(items["name"]))]
        inputs = first.encode(items["source"], items["target_skeleton"], seeds)
        for row in rows:
            _, pipe, sampler, steps = row
            settings = pipe.settings(sampler=sampler, steps=steps)
            if start == 0:
                pipe.sample(inputs, settings=settings)  # untimed warm-up: CUDA start-up, compilation
            sync(first.device)
            tic = time.perf_counter()
            latents = pipe.sample(inputs, settings=settings)
            sync(first.device)
            seconds[row] += time.perf_counter() - tic
            images[row].append(pipe.decode(latents))
    return {row: (torch.cat(images[row]), seconds[row]) for row in rows}


def scores(images, targets, reference, inception=None, target_features=None, size=256):
    """A row's figures for one seed: uint8 images against the uint8 targets (and `reference`, the teacher's first
    DDIM row's images, or None for that row itself)."""
    result = {"SSIM": np.mean([ssim(t, g) for t, g in zip(targets, images)]),
              "PSNR": np.mean([psnr(t, g) for t, g in zip(targets, images)]),
              "PSNR vs teacher": np.mean([psnr(r, g) for r, g in zip(reference, images)]) if reference else None,
              "sharpness": np.mean([sharpness(g) for g in images]),
              "SWD": swd(np.stack(targets), np.stack(images))["mean"]}
    if inception is not None:
        result["KID"] = kid(target_features, inception_of(inception, images, size))[0]
    return result


def inception_of(inception, images, size, batch_size=64):
    """Inception features (N, D), float64, of uint8 images, in batches on the network's device."""
    device = inception.scale.device
    return torch.cat([inception(torch.stack([fid_input(g, size) for g in images[i:i + batch_size]]).to(device)).cpu()
                      for i in range(0, len(images), batch_size)]).double().numpy()


def cell(values, digits):
    """mean ± standard deviation (over the seeds) of a column, '-' where it does not apply."""
    if values[0] is None:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


DIGITS = {"SSIM": 4, "PSNR": 2, "PSNR vs teacher": 2, "sharpness": 0, "SWD": 2, "KID": 4, "s / image": 4}


def plane(table, targets_sharpness, path):
    """Every row as a point on the SSIM-sharpness plane (mean, with the spread over seeds as bars): the teacher's
    DDIM and DPM-Solver++ rows and the student's as lines over their step counts, and the other students by series
    (a name's words but the last: "consistency 250" and "consistency 500" are one line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    series = {}
    for (model, sampler, steps), figures in table.items():
        if model in ("teacher", "student"):
            series.setdefault(f"teacher {sampler}" if model == "teacher" else "student", []).append((str(steps),
                                                                                                  figures))
        else:
            name, _, point = model.rpartition(" ")
            series.setdefault(f"{name or model} ({steps} steps)", []).append((point if name else model, figures))
    for label, points in series.items():
        x = [np.mean(f["sharpness"]) for _, f in points]
        y = [np.mean(f["SSIM"]) for _, f in points]
        ax.errorbar(x, y, xerr=[np.std(f["sharpness"]) for _, f in points],
                    yerr=[np.std(f["SSIM"]) for _, f in points], marker="o", capsize=2, label=label)
        for (text, _), xi, yi in zip(points, x, y):
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(targets_sharpness, color="grey", linestyle=":", label="targets' sharpness")
    ax.set_xlabel("sharpness (variance of the Laplacian)")
    ax.set_ylabel("SSIM against the targets")
    ax.set_title("Samplers on the SSIM-sharpness plane (numbers: steps, or training steps of a series)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the teacher's config (default: the demo's)")
    p.add_argument("--ckpt", help="the teacher's weights (default: the bundled demo model)")
    p.add_argument("--student-config", default=str(FAST_DEMO_CONFIG), help="the student's config")
    p.add_argument("--student-ckpt", default=str(FAST_DEMO_CHECKPOINT), help="the student's weights")
    p.add_argument("--curve", nargs="*", default=[], metavar="NAME=CHECKPOINT",
                   help="other students of the student's architecture, measured at --curve-steps (a distillation's "
                        "checkpoints, exported with scripts.export_weights)")
    p.add_argument("--curve-steps", type=int, default=4, help="the sampling steps of the --curve students")
    p.add_argument("--data", help="dataset root (default: the teacher config's data.root)")
    p.add_argument("--limit", type=int, help="only the first N test pairs (default: all; every row's images are held "
                                             "in memory, so on DeepFashion take a thousand or so)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs sampled together")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the noise (pair i: item_seed(seed, i)); every figure is their mean")
    p.add_argument("--ddim", type=int, nargs="+", default=[50, 20, 10],
                   help="the teacher's DDIM step counts; the first is the reference of 'PSNR vs teacher'")
    p.add_argument("--dpm", type=int, nargs="*", default=[20, 10, 5], help="the teacher's DPM-Solver++ step counts")
    p.add_argument("--student", type=int, nargs="*", default=[1, 2, 4, 8], help="the student's step counts")
    p.add_argument("--grid", nargs="*", default=["teacher ddim 50", "teacher dpm++ 10", "student lcm 4"],
                   help="the rows shown in the grid, as 'model sampler steps'")
    p.add_argument("--grid-pairs", type=int, default=8, help="pairs in the grid")
    p.add_argument("--inception", help=f"Inception-v3 weights for KID (default: $TORCH_HOME's {INCEPTION_FILE} "
                                       f"when it is there; without, no KID)")
    p.add_argument("--out", default="outputs/samplers", help="folder of samplers.md, samplers.png and plane.png")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--compile", action="store_true", help="compile the denoisers with torch.compile")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    args = p.parse_args(argv)
    curve = [item.partition("=") for item in args.curve]
    if any(not name or not sep or not ckpt for name, sep, ckpt in curve):
        p.error("--curve takes NAME=CHECKPOINT items")
    args.curve = {name: ckpt for name, _, ckpt in curve}
    if len(args.curve) < len(curve) or {"teacher", "student"} & set(args.curve):
        p.error("--curve names must differ from each other and from 'teacher' and 'student'")
    measured = ([f"teacher ddim {n}" for n in args.ddim] + [f"teacher dpm++ {n}" for n in args.dpm]
                + [f"student lcm {n}" for n in args.student]
                + [f"{name} lcm {args.curve_steps}" for name in args.curve])
    for name in args.grid:
        if name not in measured:
            p.error(f"--grid {name!r} is not a measured row; the rows are {', '.join(measured)}")
    args.config, args.ckpt = model_files(p, args)
    return args


def inception_features(args, device):
    """The KID network when its weights are there (--inception, or $TORCH_HOME's file), else None."""
    path = Path(args.inception) if args.inception else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if args.inception and not path.is_file():
        raise SystemExit(f"compare_samplers: --inception {path}: no such file")
    return InceptionFeatures(build_inception(path)).to(device) if path.is_file() else None


def main(argv=None):
    args = parse_args(argv)
    with reported("compare_samplers", args.debug):
        compare(args)


def compare(args):
    """The table, the grid and the plane, as `args` say."""
    device = torch.device(args.device) if args.device else default_device()
    cfg = load_config(args.config)
    teacher = Pipeline.from_config(cfg, args.ckpt, device, args.compile)
    students = {"student": Pipeline.from_config(args.student_config, args.student_ckpt, device, args.compile,
                                                teacher.encoders)}
    students.update({name: Pipeline.from_config(args.student_config, ckpt, device, args.compile, teacher.encoders)
                     for name, ckpt in args.curve.items()})
    pairs = PairDataset(args.data or cfg["data"]["root"], teacher.size, "test")
    pairs = [pairs[i] for i in range(min(args.limit or len(pairs), len(pairs)))]
    rows = ([("teacher", teacher, "ddim", n) for n in args.ddim] + [("teacher", teacher, "dpm++", n) for n in args.dpm]
            + [("student", students["student"], "lcm", n) for n in args.student]
            + [(name, students[name], "lcm", args.curve_steps) for name in args.curve])
    inception = inception_features(args, device)
    targets = [to_uint8(p["target"]) for p in pairs]
    target_features = inception_of(inception, targets, teacher.size) if inception is not None else None
    table = {(who, sampler, steps): {} for who, _, sampler, steps in rows}
    shown = {}
    for seed in args.seeds:
        results = generate(rows, pairs, seed, args.batch_size)
        reference = [to_uint8(x) for x in results[rows[0]][0]]
        for row in rows:
            key = (row[0], row[2], row[3])
            images = [to_uint8(x) for x in results[row][0]]
            figures = scores(images, targets, None if row == rows[0] else reference, inception, target_features,
                             teacher.size)
            figures["s / image"] = results[row][1] / len(pairs)
            for name, value in figures.items():
                table[key].setdefault(name, []).append(value)
            if seed == args.seeds[0]:
                shown[" ".join(map(str, key))] = results[row][0]
    columns = ["SSIM", "PSNR", "PSNR vs teacher", "sharpness", "SWD"] + (["KID"] if inception else []) + ["s / image"]
    targets_sharpness = np.mean([sharpness(t) for t in targets])
    lines = [f"{len(pairs)} test pairs, seeds {', '.join(map(str, args.seeds))} (mean ± standard deviation over them), "
             f"{device}, {torch.get_num_threads()} threads; targets' sharpness {targets_sharpness:.0f}; PSNR vs "
             f"teacher: against the teacher's DDIM-{args.ddim[0]} image from the same noise" +
             ("" if inception else "; no KID (no Inception weights)"), "",
             "| model | sampler | steps | evaluations / image | " + " | ".join(columns) + " |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |"]
    for (who, sampler, steps), figures in table.items():
        evaluations = steps if sampler == "lcm" else 2 * steps
        lines.append(f"| {who} | {sampler} | {steps} | {evaluations} | "
                     + " | ".join(cell(figures[c], DIGITS[c]) for c in columns) + " |")
    out = Path(args.out)
    with atomic_path(out / "samplers.md") as staged:
        staged.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    grid = torch.cat([grid_row(p["source"], p["target"], *(shown[name][i] for name in args.grid))
                      for i, p in enumerate(pairs[:args.grid_pairs])], dim=1)
    save_png(grid, out / "samplers.png")
    with atomic_path(out / "plane.png") as staged:
        plane(table, targets_sharpness, staged)
    print(f"wrote {out / 'samplers.md'}, {out / 'samplers.png'} (source | target | {' | '.join(args.grid)}) and "
          f"{out / 'plane.png'}")


if __name__ == "__main__":
    main()
