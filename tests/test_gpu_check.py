"""scripts/gpu_check.py runs every row (at tiny sizes, on the CPU, as CI runs it), and torch.compile gives the
eager guided step, compiling once."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from models import XMDPT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_runs_every_row(tmp_path):
    out = tmp_path / "gpu_check.md"
    run = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--quick", "--device", "cpu", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert text == run.stdout
    assert re.search(r"\*\*Device:\*\* CPU .*\*\*torch\*\* .*\*\*Date:\*\* \d{4}-\d\d-\d\d\. \*\*Command:\*\* "
                     r"`python -m scripts.gpu_check --quick --device cpu", text)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row[0].lstrip("| ") for row in rows]
    assert names == (["CUDA tests"] + ["guided step, ours eager", "guided step, ours compiled",
                                       "guided step, released (re-enacted)"] * 2
                     + ["training step"] * 5
                     + [f"one photo in 2 poses: {v}" for v in ("ddim", "student", "student, photo encoded once")]
                     + ["inference, end to end", "the whole check"])
    assert re.search(r"\d+ (skipped|passed)", rows[0][2])
    for row in rows[1:7]:
        assert re.search(r"[0-9.]+ ms", row[2]), row
    assert all(re.search(r"peak [0-9.]+ GiB", row[2]) for row in rows[7:12])
    for row in rows[12:15]:
        assert re.search(r"[0-9]+ ms; [0-9.]+x faster than DDIM", row[2]), row
        assert all(re.search(rf"{stage} [0-9]+ ms \([0-9]+ GFLOP\)", row[3]) for stage in
                   ("skeleton encoder", "source encoders", "sampling", "decoding")), row
    assert rows[14][3].rstrip(" |").endswith("images as without reuse: yes")
    assert re.search(r"ours [0-9.]+ images/s .* released [0-9.]+ images/s: [0-9.]+x", rows[15][2])


@pytest.mark.slow
def test_the_compiled_guided_step_equals_the_eager_one_and_compiles_once():
    """torch.compile (inductor, on the CPU) of the denoiser: the guided step gives the eager one's output to
    1e-4, and a second step with other inputs of the same shapes runs without compiling again."""
    torch.manual_seed(0)
    model = XMDPT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, decode_layer=1, num_heads=2,
                  pose_dim=16, image_dim=24, dino_tokens=5, mipnet="none").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    inputs = lambda seed: (torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                           torch.tensor([5, 500, 999]))
    cond = dict(pose=torch.randn(3, 5, 16), image=torch.randn(3, 5, 24), source=torch.randn(3, 4, 8, 8))
    with torch.no_grad():
        guided = model.guided(**cond)
        eager = [guided(*inputs(seed)) for seed in (1, 2)]
        model.compile_denoiser()
        counters.clear()
        compiled = [guided(*inputs(1))]
        graphs = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled.append(guided(*inputs(2)))
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs  # compiled once, not again
    for a, b in zip(compiled, eager):
        assert ((a - b).norm() / b.norm()).item() <= 1e-4
    assert not torch.equal(eager[0], eager[1])


# Names as torch.cuda.get_device_name gives them, and the datasheet figures (dense bf16 TFLOP/s, TB/s) each device
# has; a name that another's contains (GH200 and H200, A100 and A10, the A100's 40 GB and 80 GB cards, the H100's
# SXM, PCIe and NVL forms) must get its own.
DATASHEETS = [("NVIDIA GH200 480GB", 989, 4.0), ("NVIDIA H200", 989, 4.8), ("NVIDIA H100 80GB HBM3", 989, 3.35),
              ("NVIDIA H100 PCIe", 756, 2.0), ("NVIDIA H100 NVL", 835, 3.9), ("NVIDIA A100-SXM4-80GB", 312, 2.0),
              ("NVIDIA A100-SXM4-40GB", 312, 1.555), ("NVIDIA A100-PCIE-40GB", 312, 1.555),
              ("NVIDIA A100 80GB PCIe", 312, 1.935), ("NVIDIA A10", 125, 0.6), ("NVIDIA L4", 121, 0.3),
              ("NVIDIA L40S", 362, 0.86), ("NVIDIA GeForce RTX 4090", 165, 1.0)]


@pytest.mark.parametrize("name, peak, bandwidth", DATASHEETS)
def test_each_device_gets_its_own_peak_and_bandwidth(name, peak, bandwidth):
    from scripts.gpu_check import DEVICES, device_kind
    assert DEVICES[device_kind(name)] == (peak, bandwidth)


def test_an_unknown_device_gets_no_peak():
    """An A10G (a name that contains the A10's) or a CPU is unknown, rather than given another device's figures."""
    from scripts.gpu_check import device_kind
    assert device_kind("NVIDIA A10G") is None and device_kind("") is None
