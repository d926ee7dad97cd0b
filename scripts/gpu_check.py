"""Everything CUDA, measured by one command: one markdown table, printed and written to --out.

  python -m scripts.gpu_check                        # on a GPU, at the real sizes (a few minutes on an H100)
  python -m scripts.gpu_check --quick --device cpu   # every row at tiny sizes, in under a minute (CI runs this)

Rows, with random weights of the real sizes:
- the CUDA tests (pytest -m cuda);
- the guided sampling step of S/2 and B/2 at batch 32 (bf16 on CUDA), eager and compiled (and the compile time),
  against the released step re-enacted on the same device: time, speed-up, output difference, achieved TFLOP/s
  and its share of the device's bf16 peak;
- a training step of S/2 at batch 32, with the feature cache and without: steps/s and peak memory; the peak
  memory of B/2 and L/2 at 256 (batch 32) and of L/2 at 512 (batch 5 per GPU, the paper's 10 over 2 GPUs);
- S/2 inference stage by stage (DINOv2-B/14 on the skeleton, DINOv2-G/14 and the SD VAE encoder on the source,
  sampling, decoding; time and GFLOP per image) for one photo in 8 poses: with 50 guided DDIM steps, with a 4-step
  student, and with the student and the photo encoded once; and the whole against the released pipeline re-enacted:
  images/s, and s/image beside the paper's 1.1 s for S on an A100.
--quick runs the same rows on tiny networks (compiled with the aot_eager backend, which traces as the real
compile does without generating code), so that the script never rots; its numbers mean nothing.
"""
import argparse
import datetime
import gc
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from devices import autocast, default_device
from measure.timing import gflops, timed
from measure.workloads import (STAGES, measure_inference, measure_training, random_inputs, real_encoders,
                               released_guided_step, stage_work)
from models import XMDPT, XMDPT_CONFIGS
from models.encoders import SD_VAE_GEOMETRY
from models.xmdpt import GUIDANCE

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (TB/s) from the vendors' datasheets, by the words of
# the device's name (split at spaces and hyphens, any case) that pick the device out: `device_kind` takes the entry
# all of whose words the name has, the one with the most words. So an H200 is no GH200, an A100 no A10, and an
# A100 with 40GB in its name has the 40 GB card's bandwidth. A name that no entry fits (an A10G) is unknown.
DEVICES = {"4090": (165, 1.0), "A10": (125, 0.6), "A100": (312, 2.0), "A100 40GB": (312, 1.555),
           "A100 80GB PCIe": (312, 1.935), "GH200": (989, 4.0), "H100": (989, 3.35), "H100 NVL": (835, 3.9),
           "H100 PCIe": (756, 2.0), "H200": (989, 4.8), "L4": (121, 0.3), "L40S": (362, 0.86)}
A100_PEAK, A100_BANDWIDTH = DEVICES["A100"]  # the GPU of the paper's 1.1 s per image (the 80 GB SXM)
PAPER_S_PER_IMAGE = 1.1
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)


class Sizes:
    """What the rows run: the real sizes, or tiny stand-ins (--quick)."""

    def __init__(self, quick):
        self.quick = quick
        self.batch, self.steps, self.repeats = (2, 2, 1) if quick else (32, 50, 5)
        self.poses = 2 if quick else 8  # one photo in this many poses
        self.size = 32 if quick else 256
        self.compile_backend = "aot_eager" if quick else "inductor"

    def config(self, name, size=None):
        """The XMDPTConfig of a preset at an image size (tiny stand-ins with --quick)."""
        size = size or self.size
        if self.quick:
            width = {"XMDPT-S/2": 64, "XMDPT-B/2": 96, "XMDPT-L/2": 128}[name]
            return replace(XMDPT_CONFIGS[name], input_size=size // 2, patch_size=4, hidden_size=width, depth=3,
                           num_heads=2, pose_dim=384, image_dim=384)
        return replace(XMDPT_CONFIGS[name], input_size=size // SD_VAE_GEOMETRY[0])

    def encoders(self, device):
        if self.quick:
            return real_encoders(device, "vits14", "vits14", TINY_VAE, depth=1)
        return real_encoders(device)


def fresh(device):
    """Free what the last row held, and start counting peak memory anew."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_kind(name):
    """The key of DEVICES that a device's name fits (None: unknown, or a CPU's empty name)."""
    words = set(re.split(r"[\s-]+", name.lower()))
    fits = [key for key in DEVICES if set(key.lower().split()) <= words]
    return max(fits, key=lambda key: len(key.split()), default=None)


def device_name(device):
    """The GPU's name, or "" for a CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cuda_tests():
    """The tests marked cuda, in a pytest of their own."""
    tic = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    last = (run.stdout.strip().splitlines() or run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
    counts = re.findall(r"(\d+ (?:passed|failed|skipped|errors?|deselected))", last)
    return [("CUDA tests", "pytest -m cuda", ", ".join(counts) or last,
             f"{time.perf_counter() - tic:.0f} s")]


@torch.no_grad()
def sampling(sizes, device):
    """The guided DDIM step, eager and compiled, against the released step, for S/2 and B/2."""
    rows = []
    for name in ("XMDPT-S/2", "XMDPT-B/2"):
        fresh(device)
        torch.manual_seed(0)
        model = XMDPT(sizes.config(name), mipnet="none").to(device).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        x, t, cond = random_inputs(model, sizes.batch, device)
        with autocast(device):
            guided = model.guided(**cond, **GUIDANCE)
            ours, released = guided(x, t), released_guided_step(model, x, t, **cond, **GUIDANCE)
            eager_s = timed(lambda: guided(x, t), device, sizes.repeats)
            released_s = timed(lambda: released_guided_step(model, x, t, **cond, **GUIDANCE),
                               device, sizes.repeats)
            work = gflops(lambda: guided(x, t))
            model.compile_denoiser(backend=sizes.compile_backend)
            tic = time.perf_counter()
            compiled = guided(x, t)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - tic
            compiled_s = timed(lambda: guided(x, t), device, sizes.repeats)
        peak = DEVICES[kind][0] if (kind := device_kind(device_name(device))) else None
        share = lambda s: f", {work / s / 1e3 / peak:.0%} of the bf16 peak" if peak else ""
        setting = f"{name}, batch {sizes.batch}, {'bf16' if device.type == 'cuda' else 'float32'}"
        rows += [("guided step, ours eager", setting, f"{eager_s * 1e3:.2f} ms, {work / eager_s / 1e3:.3g} TFLOP/s"
                  f"{share(eager_s)}; {released_s / eager_s:.2f}x the released step", f"{work:.3g} GFLOP"),
                 ("guided step, ours compiled", setting, f"{compiled_s * 1e3:.2f} ms, {work / compiled_s / 1e3:.3g} "
                  f"TFLOP/s{share(compiled_s)}; {released_s / compiled_s:.2f}x the released step; compiled in "
                  f"{compile_s:.0f} s", f"differs from eager by {rel(compiled, ours):.1e}"),
                 ("guided step, released (re-enacted)", setting, f"{released_s * 1e3:.2f} ms",
                  f"ours differs by {rel(ours, released):.1e}")]
        model = guided = None  # freed before the next model is built
    return rows


def training(sizes, device):
    """Training steps: S/2 timed with and without the cache; B/2, L/2 and L/2 at 512 for their memory."""
    rows = []
    for name, batch, image, cached, timed_row in (("XMDPT-S/2", sizes.batch, sizes.size, True, True),
                                                  ("XMDPT-S/2", sizes.batch, sizes.size, False, True),
                                                  ("XMDPT-B/2", sizes.batch, sizes.size, True, False),
                                                  ("XMDPT-L/2", sizes.batch, sizes.size, True, False),
                                                  ("XMDPT-L/2", 5 if not sizes.quick else 1, 2 * sizes.size, True,
                                                   False)):
        fresh(device)
        nets = sizes.encoders(device) if sizes.quick or not cached else None
        r = measure_training(name, batch, device, cached, sizes.repeats if timed_row else 1, image,
                             sizes.config(name, image), nets)
        setting = f"{name} at {image}, batch {batch}, {'feature cache' if cached else 'online encoders'}"
        speed = f"{r['steps_per_s']:.2f} steps/s, " if timed_row else ""
        rows.append(("training step", setting, f"{speed}peak {r['peak_gib']:.1f} GiB", ""))
    return rows


@torch.no_grad()
def inference(sizes, device):
    """S/2 inference stage by stage: one photo in N poses with DDIM-50, with a 4-step student, and with the student
    and the photo encoded once; and the whole against the released pipeline re-enacted (its encoders and decoding
    ours, its sampling step the released one's)."""
    fresh(device)
    nets = sizes.encoders(device)
    config = sizes.config("XMDPT-S/2")
    r = measure_inference("XMDPT-S/2", sizes.poses, device, sizes.size, config, nets, sizes.steps)
    work = {"ddim": stage_work(config, sizes.steps, False, sizes.size, sizes.encoders),
            "student": stage_work(config, 4, True, sizes.size, sizes.encoders)}
    rows, base = [], sum(r["seconds"]["ddim"].values())
    for variant, seconds in r["seconds"].items():
        total = sum(seconds.values())
        kind = "student" if variant.startswith("student") else "ddim"
        stages = ", ".join(f"{stage} {seconds[stage] / sizes.poses * 1e3:.0f} ms ({work[kind][stage]:.0f} GFLOP)"
                           for stage in STAGES)
        rows.append((f"one photo in {sizes.poses} poses: {variant}", f"XMDPT-S/2 at {sizes.size}, per image",
                     f"{total / sizes.poses * 1e3:.0f} ms; {base / total:.2f}x faster than DDIM", stages))
    rows[-1] = (*rows[-1][:3], rows[-1][3] + f"; images as without reuse: {'yes' if r['identical'] else 'NO'}")
    seconds = r["seconds"]["ddim"]
    model = XMDPT(config, mipnet="none").to(device).eval()
    x, t, cond = random_inputs(model, sizes.poses, device)
    with autocast(device):
        step_s = timed(lambda: released_guided_step(model, x, t, **cond, **GUIDANCE), device, 1)
    released = seconds["skeleton encoder"] + seconds["source encoders"] + sizes.steps * step_s + seconds["decoding"]
    kind = device_kind(device_name(device))
    versus = f"the paper: {PAPER_S_PER_IMAGE} s on an A100"
    if kind:
        peak, bandwidth = DEVICES[kind]
        versus += (f"; this {kind} has {peak / A100_PEAK:.1f}x an A100's bf16 peak and "
                   f"{bandwidth / A100_BANDWIDTH:.1f}x its memory bandwidth")
    setting = f"XMDPT-S/2, batch {sizes.poses}, {sizes.steps} guided DDIM steps, encoders and decoding"
    return rows + [("inference, end to end", setting, f"ours {sizes.poses / base:.2f} images/s "
                    f"({base / sizes.poses:.3f} s/image), released {sizes.poses / released:.2f} images/s: "
                    f"{released / base:.2f}x; peak {r['peak_gib']:.1f} GiB", versus)]


def table(rows, device, command):
    """The markdown table, with what it was measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    head = [f"**Device:** {name}. **torch** {torch.__version__}, **CUDA** {torch.version.cuda or '-'}. "
            f"**Date:** {datetime.date.today().isoformat()}. **Command:** `{command}`", "",
            "| measurement | setting | result | note |", "| --- | --- | --- | --- |"]
    return "\n".join(head + [f"| {' | '.join(row)} |" for row in rows]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny networks: checks that every row runs, fast")
    parser.add_argument("--out", default="outputs/gpu_check.md", help="where the table is written")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the CUDA tests row")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sizes = Sizes(args.quick)
    command = "python -m scripts.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    tic = time.perf_counter()
    rows = [] if args.skip_tests else cuda_tests()
    for part in (sampling, training, inference):
        rows += part(sizes, device)
    rows.append(("the whole check", "", f"{time.perf_counter() - tic:.0f} s", ""))
    text = table(rows, device, command.strip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
