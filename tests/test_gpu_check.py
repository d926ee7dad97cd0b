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
                     + ["training step"] * 5 + ["inference, end to end", "the whole check"])
    assert re.search(r"\d+ (skipped|passed)", rows[0][2])
    for row in rows[1:7]:
        assert re.search(r"[0-9.]+ ms", row[2]), row
    assert all(re.search(r"peak [0-9.]+ GiB", row[2]) for row in rows[7:12])
    assert re.search(r"ours [0-9.]+ images/s .* released [0-9.]+ images/s: [0-9.]+x", rows[12][2])


@pytest.mark.slow
def test_the_compiled_guided_step_equals_the_eager_one_and_compiles_once():
    """torch.compile (inductor, on the CPU) of the denoiser: the guided step gives the eager one's output to
    1e-4, and a second step with other inputs of the same shapes runs without compiling again."""
    torch.manual_seed(0)
    model = XMDPT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
                  image_dim=24, dino_tokens=5, mipnet="none").eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    inputs = lambda seed: (torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                           torch.tensor([5, 500, 999]))
    cond = dict(pose=torch.randn(3, 5, 16), image=torch.randn(3, 5, 24), source=torch.randn(3, 4, 8, 8))
    with torch.no_grad():
        guided = model.guided(**cond, cfg_scale=2.0, scale_pow=0.01)
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
