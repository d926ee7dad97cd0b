"""Benchmarks: the work counted with torch's FLOP counter (on the meta device, so any size is free to count),
the time measured with random weights of the real sizes, printed as tables.

  python -m scripts.benchmark sampling [--model XMDPT-S/2] [--batch 4] [--device cpu]
  python -m scripts.benchmark train    [--models XMDPT-S/2 XMDPT-B/2] [--batch 4] [--device cuda]
  python -m scripts.benchmark infer    [--models XMDPT-S/2] [--poses 8] [--device cuda]
  python -m scripts.benchmark demo     [--repeats 3]

sampling: one guided DDIM step against the released implementation's step, re-enacted on the same weights:
  two separate forwards, each recomputing the condition and pushing the source tokens through every block,
  with the released attention (explicit softmax(q k^T * scale + bias) v, the relative position bias gathered
  from its table on every call).
train: steps/s and peak memory of a training step (unmasked + masked forward, backward, AdamW, EMA) with
  the feature cache (no encoder runs) and without it (DINOv2-B on the target skeleton, DINOv2-G on the
  source, the SD VAE on both images); the FLOP table also counts what the released loop ran and never used.
infer: the work of each inference stage per image (DINOv2-B on the target skeleton; DINOv2-G and the VAE encoder
  on the source; the sampling, 50 guided DDIM steps or a 4-step student's; the VAE decoder), then one photo in N
  poses timed stage by stage three ways: DDIM and the student making N separate images (each encodes the photo),
  and the student with the photo encoded once (infer_xmdpt.py --source, the app's All poses); whether the
  student's images are the same with and without encoding once; peak memory.
demo: python infer_xmdpt.py and python infer_xmdpt.py --fast as typed, each part of the run timed (the encoders,
  sampling, decoding, PNG writing, the scores) and the whole after start-up, and their ratio.
Each measured row of train and infer runs in a fresh process, so peak memory (CUDA allocator, or the process's peak RSS on
the CPU) belongs to that row alone.
"""
import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import torch

import infer_xmdpt

from devices import default_device
from inference import Pipeline, pairs
from measure.timing import gflops, timed
from measure.workloads import (SD_VAE, STAGES, measure_inference, measure_training, random_inputs,
                               released_guided_step, stage_work)
from models import XMDPT, XMDPT_CONFIGS, Diffusion
from models.consistency import ConsistencyDistillation
from models.encoders import DINOv2, VAEFirstStage
from models.objective import XMDPTLoss
from models.xmdpt import GUIDANCE

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ sampling

@torch.no_grad()
def bench_sampling(args):
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = XMDPT(XMDPT_CONFIGS[args.model]).to(device).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    x, t, cond = random_inputs(model, args.batch, device)
    guided = model.guided(**cond, **GUIDANCE)
    ours = lambda: guided(x, t)
    released = lambda: released_guided_step(model, x, t, **cond, **GUIDANCE)
    a, b = ours(), released()
    err = ((a - b).norm() / b.norm()).item()
    names, fns = ("ours (one batched forward)", "released schedule"), (ours, released)
    times = [[], []]
    for _ in range(args.repeats):  # interleaved, so that drifts in machine load hit both alike
        for i, fn in enumerate(fns):
            times[i].append(timed(fn, device, 1))
    rows = []
    for name, fn, ts in zip(names, fns, times):
        work = gflops(fn) / args.batch
        sec = sorted(ts)[len(ts) // 2]
        rows.append((name, work, sec, work * args.batch / sec))
    print(f"{args.model}, batch {args.batch}, {device}, {torch.get_num_threads()} threads; "
          f"one guided DDIM step; outputs agree to {err:.1e} (relative)")
    print(f"{'step':30s} {'GFLOP/sample':>13s} {'s/step':>9s} {'GFLOP/s':>9s}")
    for name, work, sec, rate in rows:
        print(f"{name:30s} {work:13.2f} {sec:9.3f} {rate:9.1f}")
    print(f"speed-up: {rows[1][2] / rows[0][2]:.2f}x")


# ------------------------------------------------------------------------------------------------ training

def count_training(name, batch):
    """GFLOP of one training step by component, counted on the meta device."""
    with torch.device("meta"):
        model = XMDPT(XMDPT_CONFIGS[name])
        x, _, cond = random_inputs(model, batch, torch.device("meta"))
        objective = XMDPTLoss(model, Diffusion())
        pose_net, image_net = DINOv2("vitb14", "random"), DINOv2("vitg14", "random")
        vae = VAEFirstStage.from_config(SD_VAE)
        pixels = torch.randn(batch, 3, 256, 256)
        dino = torch.randn(batch, 3, 224, 224)
        source_path = lambda: [b(model.tdnet.embed(cond["source"]), torch.randn(batch, model.config.hidden_size))
                               for b in model.tdnet.blocks]
        pose_work = gflops(lambda: pose_net.net.forward_features(dino))
        image_work = gflops(lambda: image_net.net.forward_features(dino))
        return {"model fwd+bwd (plain + masked)": gflops(lambda: objective(x, cond)["total"].backward()),
                "VAE encode (target + source)": 2 * gflops(lambda: vae.vae.encode(pixels)),
                "DINOv2-B/14 (target skeleton)": pose_work,
                "DINOv2-G/14 (source image)": image_work,
                "released only: DINOv2-G/14 on the target, DINOv2-B/14 on the source skeleton, unused "
                "source path": image_work + pose_work + gflops(lambda: torch.no_grad()(source_path)())}


def count_distillation(name, batch):
    """GFLOP of one consistency distillation step (models/consistency.py): the teacher's guided forward of 2N,
    the student's forward and backward, the target's forward; counted on the meta device."""
    with torch.device("meta"):
        teacher = XMDPT(XMDPT_CONFIGS[name], mipnet="none")
        student = XMDPT(teacher.config, consistency=True)
        objective = ConsistencyDistillation(student, XMDPT(student.config).requires_grad_(False), teacher,
                                            Diffusion())
        x, _, cond = random_inputs(student, batch, torch.device("meta"))
        return gflops(lambda: objective(x, cond)["total"].backward())


def count_dmd2(name, batch, ratio=5, steps=4):
    """GFLOP of DMD2 (models/dmd2.py) per training step, on average over its two time scales, from its passes
    counted on the meta device (N = batch): every step, the student's sample after backward simulation (on average
    (steps - 1) / 2 forwards without gradient, then one), and the fake score's forward and backward on noisy
    samples and on noisy real images (the head's few FLOPs aside); every `ratio`-th step, the student's backward,
    the guided teacher (2N) and the fake score without gradient, and the fake score's forward and backward for the
    student's GAN term."""
    with torch.device("meta"):
        teacher = XMDPT(XMDPT_CONFIGS[name], mipnet="none")
        student = XMDPT(teacher.config, consistency=True)
        x, t, cond = random_inputs(student, batch, torch.device("meta"))
        forward = gflops(lambda: student(x, t, **cond))
        both_ways = gflops(lambda: student(x, t, **cond).sum().backward())
        guided = gflops(lambda: teacher.guided(**cond)(x, t))
    every = (steps - 1) / 2 * forward + forward + 2 * both_ways
    student_step = (both_ways - forward) + guided + forward + both_ways
    return every + student_step / ratio


def bench_train(args):
    for name in args.models:
        work = count_training(name, args.count_batch)
        print(f"\n{name}: work of one training step at batch {args.count_batch} (GFLOP)")
        for part, value in work.items():
            print(f"  {part:60s} {value:12.0f}")
        step = sum(v for k, v in work.items() if not k.startswith("released"))
        print(f"  {'ours without cache / with cache / released loop':60s} {step:12.0f} / "
              f"{work['model fwd+bwd (plain + masked)']:.0f} / {step + work[next(reversed(work))]:.0f}")
        print(f"  {'a consistency distillation step (cached)':60s} {count_distillation(name, args.count_batch):12.0f}")
        print(f"  {'a DMD2 step, averaged over its time scales (cached, ratio 5)':60s} "
              f"{count_dmd2(name, args.count_batch):12.0f}")
    print(f"\nmeasured on {args.device}, batch {args.batch}")
    print(f"{'model':12s} {'cache':6s} {'steps/s':>9s} {'samples/s':>10s} {'peak GiB':>9s}")
    for name in args.models:
        for cached in (True, False) if not args.cached_only else (True,):
            r = run_row("train", dict(name=name, batch=args.batch, device=args.device, cached=cached,
                                      repeats=args.repeats))
            print(f"{name:12s} {'yes' if cached else 'no':6s} {r['steps_per_s']:9.3f} "
                  f"{r['steps_per_s'] * args.batch:10.2f} {r['peak_gib']:9.2f}")


# ----------------------------------------------------------------------------------------------- inference

def poses_work(work, poses):
    """GFLOP of one photo in `poses` poses from the work per image of each stage: the photo's encoders run once
    (reuse) or once per image."""
    per_image = sum(work.values())
    once = per_image * poses - (poses - 1) * work["source encoders"]
    return {"per image": per_image * poses, "photo encoded once": once}


def bench_infer(args):
    """The work of each stage per image (DDIM and the few-step student), then one photo in N poses, timed stage by
    stage three ways: DDIM and the student making N separate images, and the student with the photo encoded once."""
    print(f"measured on {args.device}, {torch.get_num_threads()} threads; random weights of the real sizes, 256x256")
    for name in args.models:
        config = replace(XMDPT_CONFIGS[name], input_size=256 // 8)
        work = {"ddim": stage_work(config, args.steps, student=False),
                "student": stage_work(config, args.student_steps, student=True)}
        ddim, student = f"DDIM-{args.steps}", f"student, {args.student_steps} steps"
        print(f"\n{name}: work per image (GFLOP)\n\n| stage | {ddim} | {student} |\n| --- | ---: | ---: |")
        for stage in STAGES:
            print(f"| {stage} | {work['ddim'][stage]:.0f} | {work['student'][stage]:.0f} |")
        totals = {k: sum(w.values()) for k, w in work.items()}
        print(f"| **whole image** | **{totals['ddim']:.0f}** | **{totals['student']:.0f}** "
              f"({totals['ddim'] / totals['student']:.2f}x less) |")
        r = run_row("infer", dict(name=name, poses=args.poses, device=args.device, ddim_steps=args.steps,
                                  student_steps=args.student_steps))
        flops = {"ddim": poses_work(work["ddim"], args.poses)["per image"],
                 "student": poses_work(work["student"], args.poses)["per image"],
                 "student, photo encoded once": poses_work(work["student"], args.poses)["photo encoded once"]}
        base = sum(r["seconds"]["ddim"].values())
        print(f"\n{name}: one photo in {args.poses} poses, seconds of each stage (batch {args.poses})\n")
        print("| variant | " + " | ".join(STAGES) + " | total s | s / image | faster than DDIM (by the FLOP count) |")
        print("| --- | " + " | ".join("---:" for _ in STAGES) + " | ---: | ---: | ---: |")
        for variant, seconds in r["seconds"].items():
            total = sum(seconds.values())
            label = {"ddim": f"{ddim}, each image encodes the photo", "student": f"{student}, each image encodes the "
                     f"photo", "student, photo encoded once": f"{student}, the photo encoded once"}[variant]
            print(f"| {label} | " + " | ".join(f"{seconds[k]:.2f}" for k in STAGES) + f" | {total:.1f} | "
                  f"{total / args.poses:.2f} | {base / total:.2f}x ({flops['ddim'] / flops[variant]:.2f}x) |")
        reuse = r["seconds"]["student, photo encoded once"]
        alone = sum(r["seconds"]["student"].values())
        predicted = flops["student"] / flops["student, photo encoded once"]
        print(f"\nthe photo encoded once against each image encoding it, both with the student: "
              f"{alone / sum(reuse.values()):.2f}x faster ({predicted:.2f}x by the FLOP count); images identical: "
              f"{'yes' if r['identical'] else 'NO'}; peak {r['peak_gib']:.1f} GiB")


# ------------------------------------------------------------------------------------------------------ demo

DEMO_PARTS = {"start-up: weights and encoders": (Pipeline, "from_config"),
              "source encoders": (Pipeline, "encode_sources"), "skeleton encoder": (Pipeline, "encode_poses"),
              "sampling": (Pipeline, "sample"), "decoding": (Pipeline, "decode"), "PNG writing": (pairs, "save_png"),
              "scores (SSIM, PSNR)": (infer_xmdpt, "mean_scores")}


def bench_demo(args):
    """`python infer_xmdpt.py` and `python infer_xmdpt.py --fast` as typed, on the demo's test pairs, in this
    process: each part's seconds (the functions below timed where they are called) and the whole run after
    start-up (the interpreter and the imports, then the weights and the encoders loaded), and the ratio."""
    totals = {}
    print(f"{torch.get_num_threads()} threads; seconds of each part, {args.repeats} runs each, the median\n")
    print("| command | " + " | ".join(DEMO_PARTS) + " | after start-up |")
    print("| --- | " + " | ".join("---:" for _ in DEMO_PARTS) + " | ---: |")
    for command in (["--out", "outputs/benchmark_demo"], ["--fast", "--out", "outputs/benchmark_demo_fast"]):
        runs = []
        for _ in range(args.repeats):
            seconds = dict.fromkeys(DEMO_PARTS, 0.0)
            with contextlib.ExitStack() as stack:
                for part, (owner, name) in DEMO_PARTS.items():
                    stack.enter_context(patch.object(owner, name, clocked(getattr(owner, name), seconds, part)))
                tic = time.perf_counter()
                infer_xmdpt.main([*command, "--overwrite"])
                whole = time.perf_counter() - tic
            runs.append((whole - seconds["start-up: weights and encoders"], seconds))
        after, seconds = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        totals[command[0]] = after
        print(f"| python infer_xmdpt.py {' '.join(command[:-2])} | "
              + " | ".join(f"{seconds[part]:.2f}" for part in DEMO_PARTS) + f" | {after:.2f} |")
    print(f"\n--fast is {totals['--out'] / totals['--fast']:.1f}x faster after start-up")


def clocked(fn, seconds, part):
    """fn, adding the seconds of each call to seconds[part]."""
    def timed_call(*args, **kwargs):
        tic = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - tic
    return timed_call


# ---------------------------------------------------------------------------------------------------- rows

MEASURES = {"train": measure_training, "infer": measure_inference}


def run_row(kind, kwargs):
    """One measurement in a fresh process (clean peak memory); returns its result dict."""
    out = subprocess.run([sys.executable, "-m", "scripts.benchmark", "_row", kind, json.dumps(kwargs)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("sampling", help="one guided DDIM step: ours against the released schedule of work")
    p.add_argument("--model", default="XMDPT-S/2", choices=sorted(XMDPT_CONFIGS), help="model size")
    p.add_argument("--batch", type=int, default=4, help="samples per step (each runs both guidance halves)")
    p.add_argument("--device", default=str(default_device()), help="torch device, e.g. cpu or cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up; the median is shown")
    p.set_defaults(fn=bench_sampling)

    def measured(name, help, fn, repeats=None):
        p = sub.add_parser(name, help=help)
        p.add_argument("--models", nargs="+", default=["XMDPT-S/2", "XMDPT-B/2", "XMDPT-L/2"],
                       choices=sorted(XMDPT_CONFIGS), help="model sizes")
        p.add_argument("--device", default=str(default_device()), help="torch device")
        if repeats is not None:
            p.add_argument("--repeats", type=int, default=repeats,
                           help="timed runs after one warm-up; the median is shown")
        p.set_defaults(fn=fn)
        return p

    p = measured("train", "training steps/s and peak memory, with and without the feature cache", bench_train, 3)
    p.add_argument("--batch", type=int, default=32, help="samples per measured step")
    p.add_argument("--count-batch", type=int, default=32, help="batch of the FLOP count (the paper's is 32)")
    p.add_argument("--cached-only", action="store_true", help="measure only the steps with the feature cache")
    p = sub.add_parser("demo", help="python infer_xmdpt.py and its --fast, each part timed, after start-up")
    p.add_argument("--repeats", type=int, default=3, help="runs of each command; the median is shown")
    p.set_defaults(fn=bench_demo)

    p = measured("infer", "the work and time of each inference stage; one photo in N poses, with and without "
                          "encoding the photo once", bench_infer)
    p.add_argument("--poses", type=int, default=8, help="poses of the one photo, generated as one batch")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the diffusion model")
    p.add_argument("--student-steps", type=int, default=4, help="steps of the few-step student")

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_row":
        result = MEASURES[sys.argv[2]](**json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
