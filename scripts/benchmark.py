"""Benchmarks: the work counted with torch's FLOP counter (on the meta device, so any size is free to count),
the time measured with random weights of the real sizes, printed as tables.

  python -m scripts.benchmark sampling [--model XMDPT-S/2] [--batch 4] [--device cpu]
  python -m scripts.benchmark train    [--models XMDPT-S/2 XMDPT-B/2] [--batch 4] [--device cuda]
  python -m scripts.benchmark infer    [--models XMDPT-S/2] [--batches 1 8] [--device cuda]

sampling: one guided DDIM step against the released implementation's step, re-enacted on the same weights:
  two separate forwards, each recomputing the condition and pushing the source tokens through every block,
  with the released attention (explicit softmax(q k^T * scale + bias) v, the relative position bias gathered
  from its table on every call).
train: steps/s and peak memory of a training step (unmasked + masked forward, backward, AdamW, EMA) with
  the feature cache (no encoder runs) and without it (DINOv2-B on the target skeleton, DINOv2-G on the
  source, the SD VAE on both images); the FLOP table also counts what the released loop ran and never used.
infer: images/s and peak memory of the encoders, the 50-step guided sampling and the VAE decoding, each
  and together, at each batch size.
Each measured row runs in a fresh process, so peak memory (CUDA allocator, or the process's peak RSS on
the CPU) belongs to that row alone.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from devices import default_device
from measure.timing import gflops, timed
from measure.workloads import (SD_VAE, measure_inference, measure_training, random_inputs, released_guided_step)
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
        pose_net, image_net, vae = DINOv2("vitb14", "random"), DINOv2("vitg14", "random"), VAEFirstStage.from_config(SD_VAE)
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
    print(f"\nmeasured on {args.device}, batch {args.batch}")
    print(f"{'model':12s} {'cache':6s} {'steps/s':>9s} {'samples/s':>10s} {'peak GiB':>9s}")
    for name in args.models:
        for cached in (True, False) if not args.cached_only else (True,):
            r = run_row("train", dict(name=name, batch=args.batch, device=args.device, cached=cached,
                                      repeats=args.repeats))
            print(f"{name:12s} {'yes' if cached else 'no':6s} {r['steps_per_s']:9.3f} "
                  f"{r['steps_per_s'] * args.batch:10.2f} {r['peak_gib']:9.2f}")


# ----------------------------------------------------------------------------------------------- inference

def bench_infer(args):
    with torch.device("meta"):
        pose_net, image_net, vae = DINOv2("vitb14", "random"), DINOv2("vitg14", "random"), VAEFirstStage.from_config(SD_VAE)
        dino = torch.randn(1, 3, 224, 224)
        enc = gflops(lambda: (pose_net.net.forward_features(dino), image_net.net.forward_features(dino),
                              vae.vae.encode(torch.randn(1, 3, 256, 256))))
        dec = gflops(lambda: vae.vae.decode(torch.randn(1, 4, 32, 32)))
    print(f"work per image (GFLOP): encoders {enc:.0f}, VAE decoding {dec:.0f}, sampling ({args.steps} guided steps):")
    for name in args.models:
        with torch.device("meta"):
            model = XMDPT(XMDPT_CONFIGS[name], mipnet="none")
            x, t, cond = random_inputs(model, 1, torch.device("meta"))
            print(f"  {name}: {args.steps * gflops(lambda: model.guided(**cond)(x, t)):.0f}")
    print(f"\nmeasured on {args.device}, {args.steps} DDIM steps; images/s of each stage and of the whole")
    print(f"{'model':12s} {'batch':>5s} {'encoders':>9s} {'sampling':>9s} {'decoding':>9s} {'total':>9s} {'peak GiB':>9s}")
    for name in args.models:
        for batch in args.batches:
            r = run_row("infer", dict(name=name, batch=batch, device=args.device, steps=args.steps,
                                      repeats=args.repeats))
            print(f"{name:12s} {batch:5d} {r['encoders']:9.3f} {r['sampling']:9.3f} {r['decoding']:9.3f} "
                  f"{r['total']:9.3f} {r['peak_gib']:9.2f}")


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

    def measured(name, help, fn, repeats):
        p = sub.add_parser(name, help=help)
        p.add_argument("--models", nargs="+", default=["XMDPT-S/2", "XMDPT-B/2", "XMDPT-L/2"],
                       choices=sorted(XMDPT_CONFIGS), help="model sizes")
        p.add_argument("--device", default=str(default_device()), help="torch device")
        p.add_argument("--repeats", type=int, default=repeats, help="timed runs after one warm-up; the median is shown")
        p.set_defaults(fn=fn)
        return p

    p = measured("train", "training steps/s and peak memory, with and without the feature cache", bench_train, 3)
    p.add_argument("--batch", type=int, default=32, help="samples per measured step")
    p.add_argument("--count-batch", type=int, default=32, help="batch of the FLOP count (the paper's is 32)")
    p.add_argument("--cached-only", action="store_true", help="measure only the steps with the feature cache")
    p = measured("infer", "end-to-end inference images/s and peak memory by stage", bench_infer, 1)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="batch sizes to measure")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_row":
        result = MEASURES[sys.argv[2]](**json.loads(sys.argv[3]))
        print(json.dumps(result))
        return
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
