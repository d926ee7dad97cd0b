"""Training: the demo config learns, resumes exactly, uses the feature cache, runs on 2 processes."""
import csv
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

import train_xmdpt
from configs import load_config, model_config
from data.errors import InputError
from data.sampler import SeededDataset
from data.synthetic import make_synthetic
from models import XMDPT, Diffusion, XMDPTConfig, export, load_checkpoint
from models.encoders import build_encoders
from models.objective import XMDPTLoss
from scripts.cache_features import cache_features

ROOT = Path(__file__).resolve().parents[1]
SIZE = load_config(ROOT / "configs/demo.yaml")["data"]["size"]
DEMO_TEACHER = ROOT / "assets" / "xmdpt_demo"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, num_identities=16, poses_per_identity=4, size=SIZE, seed=0)
    return root


def demo_config(root, cache=None, **train):
    cfg = load_config(ROOT / "configs/demo.yaml",
                      [f"data.root={root}", f"data.cache={cache or 'null'}", "train.sample_every=0"])
    cfg["train"].update(train)
    return cfg


def tiny_config(root, cache=None, **train):
    """A much smaller model than the demo's, for the tests of mechanics."""
    cfg = demo_config(root, cache, **train)
    cfg["model"].update(hidden_size=32, depth=3, num_heads=2, patch_size=8)
    cfg["train"]["global_batch"] = 4
    return cfg


@pytest.fixture(scope="module")
def tiny_teacher(synth, tmp_path_factory):
    """A trained-looking tiny model of tiny_config, exported as a teacher to distil."""
    torch.manual_seed(0)
    model = XMDPT(model_config(tiny_config(synth)))
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return export(model, tmp_path_factory.mktemp("teacher") / "teacher", inference_only=True)


def distill_config(root, teacher, **train):
    """configs/distill_demo.yaml at tiny_config's size, distilling `teacher`."""
    cfg = load_config(ROOT / "configs/distill_demo.yaml", [f"data.root={root}", "data.cache=null",
                                                          "train.sample_every=0", f"distill.teacher={teacher}"])
    cfg["model"].update(hidden_size=32, depth=3, num_heads=2, patch_size=8)
    cfg["train"].update(global_batch=4, **train)
    return cfg


def dmd2_config(root, teacher, student=None, **train):
    """configs/dmd2_demo.yaml at tiny_config's size, distilling `teacher` into a student started from `student`
    (None: the teacher)."""
    cfg = load_config(ROOT / "configs/dmd2_demo.yaml", [f"data.root={root}", "data.cache=null",
                                                        "train.sample_every=0", f"distill.teacher={teacher}"])
    cfg["distill"]["student"] = None if student is None else str(student)
    cfg["model"].update(hidden_size=32, depth=3, num_heads=2, patch_size=8)
    cfg["train"].update(global_batch=4, **train)
    return cfg


def read_log(out):
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def demo_cache(synth):
    cache = synth / "features"
    cache_features(demo_config(synth), cache, dtype=torch.float32, progress=False)
    return cache


@pytest.mark.slow
def test_demo_learns_and_resumes_exactly(synth, demo_cache, tmp_path):
    cfg = demo_config(synth, demo_cache, max_steps=80, log_every=1, ckpt_every=20)
    train_xmdpt.train(cfg, tmp_path / "full")
    full = [float(r["total"]) for r in read_log(tmp_path / "full")]
    assert len(full) == 80
    first, last = np.mean(full[:15]), np.mean(full[-15:])
    assert last < 0.7 * first, (first, last)

    # A run stopped at step 60 holds what the full run held then: its checkpoints, and a log that resuming
    # cuts back to step 60 (here it runs on to 80, and must be cut).
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    for name in ("checkpoints/0000040.pt", "checkpoints/0000060.pt", "log.csv"):
        shutil.copy(tmp_path / "full" / name, tmp_path / "resumed" / name)
    train_xmdpt.train(cfg, tmp_path / "resumed", resume=True)
    resumed = [float(r["total"]) for r in read_log(tmp_path / "resumed")]
    assert [int(r["step"]) for r in read_log(tmp_path / "resumed")] == list(range(1, 81))
    np.testing.assert_allclose(resumed[60:], full[60:], rtol=1e-4)


def test_cached_step_equals_online_step(synth, demo_cache):
    """The feature cache gives the layout the encoders give a batch of pixels, with the same values: the same
    latents, tokens and loss."""
    online = train_xmdpt.training_data(tiny_config(synth))
    cached = train_xmdpt.training_data(tiny_config(synth, demo_cache))
    cfg = tiny_config(synth)
    encoders = build_encoders(cfg["encoders"])
    objective = XMDPTLoss(XMDPT(model_config(cfg)), Diffusion())
    for index in range(3):
        with torch.random.fork_rng():
            torch.manual_seed(index)
            a = online[index]
        with torch.random.fork_rng():
            torch.manual_seed(index)
            b = cached[index]
        assert (a["target_path"], a["source_path"], a["flip"]) == (b["target_path"], b["source_path"], b["flip"])
        features = encoders.features(a["target"][None], a["source"][None], a["target_skeleton"][None])
        assert set(features) == {k for k in b if torch.is_tensor(b[k])}
        torch.manual_seed(1)
        x0, cond = encoders.training_inputs({k: v[None] for k, v in a.items() if torch.is_tensor(v)}, cached=False)
        torch.manual_seed(1)
        cached_x0, cached_cond = encoders.training_inputs({k: v[None] for k, v in b.items() if torch.is_tensor(v)},
                                                          cached=True)
        for x, y in zip([x0, *cond.values()], [cached_x0, *cached_cond.values()]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        torch.manual_seed(2)
        online_loss = objective(x0, cond)["total"]
        torch.manual_seed(2)
        cached_loss = objective(cached_x0, cached_cond)["total"]
        torch.testing.assert_close(online_loss, cached_loss, rtol=1e-5, atol=0)


def test_cache_read_in_workers_equals_the_main_process(synth, demo_cache):
    """The cache, opened in the main process first, read again by forked DataLoader workers."""
    cached = train_xmdpt.training_data(tiny_config(synth, demo_cache))
    keys = [(i, 100 + i) for i in range(6)]
    single = list(DataLoader(SeededDataset(cached), batch_size=3, sampler=keys, num_workers=0))
    multi = list(DataLoader(SeededDataset(cached), batch_size=3, sampler=keys, num_workers=2,
                            multiprocessing_context="fork"))
    for a, b in zip(single, multi):
        assert all(torch.equal(a[k], b[k]) for k in ("pose", "image", "target_mean", "source_logvar"))


def test_logs_checkpoints_and_samples(synth, tmp_path):
    cfg = tiny_config(synth, max_steps=4, log_every=2, ckpt_every=2)
    cfg["train"]["sample_every"] = 4
    cfg["sample"].update(steps=2, num_pairs=2)
    train_xmdpt.train(cfg, tmp_path)
    rows = read_log(tmp_path)
    assert [r["step"] for r in rows] == ["2", "4"]
    assert list(rows[0]) == ["step", "total", "plain_loss", "plain_mse", "plain_vb", "masked_loss", "masked_mse",
                             "masked_vb", "lr", "steps_per_s"]
    for row in rows:
        assert float(row["total"]) == pytest.approx(float(row["plain_loss"]) + float(row["masked_loss"]), rel=1e-6)
        assert float(row["plain_loss"]) == pytest.approx(float(row["plain_mse"]) + float(row["plain_vb"]), rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    assert (tmp_path / "samples" / "0000004.png").is_file()
    assert list((tmp_path / "tensorboard").iterdir())
    ckpt = torch.load(tmp_path / "checkpoints" / "0000004.pt", weights_only=True)
    assert ckpt["step"] == 4 and set(ckpt) == {"model", "ema", "opt", "objective", "step", "model_config", "run_config",
                                               "process"}
    assert load_checkpoint(tmp_path / "checkpoints" / "0000004.pt").config == XMDPTConfig(**ckpt["model_config"])
    with pytest.raises(FileExistsError, match="--resume"):
        train_xmdpt.train(cfg, tmp_path)


def test_resume_refuses_another_config(synth, tmp_path):
    cfg = tiny_config(synth, max_steps=1, ckpt_every=1, log_every=1)
    train_xmdpt.train(cfg, tmp_path)
    other = tiny_config(synth, max_steps=2, ckpt_every=1, log_every=1)
    other["model"]["mask_ratio"] = 0.5
    with pytest.raises(ValueError, match="model.mask_ratio"):
        train_xmdpt.train(other, tmp_path, resume=True)


def fail_at_call(monkeypatch, n, action):
    """Make the n-th training step's objective call `action(terms)` (or raise it, for an exception)."""
    real = XMDPTLoss.forward
    calls = []

    def patched(self, *args):
        calls.append(1)
        if len(calls) == n and isinstance(action, type):
            raise action
        terms = real(self, *args)
        return action(terms) if len(calls) == n else terms

    monkeypatch.setattr(XMDPTLoss, "forward", patched)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth, tmp_path, monkeypatch):
    cfg = tiny_config(synth, max_steps=5, ckpt_every=1, log_every=1)
    fail_at_call(monkeypatch, 3, lambda terms: dict(terms, total=terms["total"] * float("nan")))
    with pytest.raises(FloatingPointError, match="step 3.*0000002.pt"):
        train_xmdpt.train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000001.pt", "0000002.pt"]
    assert [r["step"] for r in read_log(tmp_path)] == ["1", "2"]  # nothing non-finite was logged either


def test_nan_loss_between_log_rows_names_its_step(synth, tmp_path, monkeypatch):
    """The loop never waits for the device: a non-finite loss is noticed at the next log row (here step 4), and
    the error still names the step it happened at, 3."""
    cfg = tiny_config(synth, max_steps=6, ckpt_every=100, log_every=4)
    fail_at_call(monkeypatch, 3, lambda terms: dict(terms, total=terms["total"] * float("inf")))
    with pytest.raises(FloatingPointError, match=r"step 3; .*none \(no checkpoint written yet\)"):
        train_xmdpt.train(cfg, tmp_path)
    assert read_log(tmp_path) == [] and not list((tmp_path / "checkpoints").iterdir())


def signal_at_call(monkeypatch, n, *signals, then=None):
    """Send this process `signals` (one after the other) from inside the n-th objective call, mid-step; `then`:
    {call: signals} sent later."""
    real, calls, schedule = XMDPTLoss.forward, [], {n: signals, **(then or {})}

    def patched(self, *args):
        calls.append(1)
        for s in schedule.get(len(calls), ()):
            os.kill(os.getpid(), s)
        return real(self, *args)

    monkeypatch.setattr(XMDPTLoss, "forward", patched)


def last_line(text):
    """The last line a run printed (after tqdm's bar)."""
    return text.replace("\r", "\n").strip().splitlines()[-1]


def steps_saved(out):
    return [int(p.stem) for p in sorted((Path(out) / "checkpoints").glob("*.pt"))]


def test_ctrl_c_finishes_the_step_and_saves_it_a_second_stops_at_once(synth, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of step 3 lets the step finish, saves its checkpoint, says so in one line and exits
    with 130 (the kill test shows it resumes exactly). Two Ctrl-C stop at once: no checkpoint, exit 130."""
    cfg = tiny_config(synth, max_steps=10, ckpt_every=100, log_every=100)
    found = signal.getsignal(signal.SIGINT)
    signal_at_call(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        train_xmdpt.train(cfg, tmp_path)
    assert stopped.value.code == 130 and steps_saved(tmp_path) == [3]
    assert torch.load(tmp_path / "checkpoints" / "0000003.pt", weights_only=True)["step"] == 3
    assert re.fullmatch(r"train_xmdpt.py: stopped by SIGINT at step 3, with its checkpoint \S*0000003.pt; continue "
                        r"with --resume", last_line(capsys.readouterr().err))
    signal_at_call(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        train_xmdpt.train(cfg, tmp_path, resume=True)
    assert stopped.value.code == 130 and steps_saved(tmp_path) == [3]
    assert "stopped at once, without saving; the newest checkpoint is" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is found  # the handler found is given back


def test_a_run_started_with_ctrl_c_ignored_keeps_ignoring_it(synth, tmp_path, monkeypatch, capsys):
    """Started with SIGINT ignored, as `nohup python train_xmdpt.py ... &` or a job runner starts it, a run goes on
    through a Ctrl-C meant for the terminal, as shells and Python do; SIGTERM still stops it on a step boundary
    with its checkpoint (exit 75), and SIGINT is left ignored afterwards."""
    cfg = tiny_config(synth, max_steps=10, ckpt_every=100, log_every=100)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signal_at_call(monkeypatch, 2, signal.SIGINT, then={5: [signal.SIGTERM]})
        with pytest.raises(SystemExit) as stopped:
            train_xmdpt.train(cfg, tmp_path)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 75 and steps_saved(tmp_path) == [5]
    assert "stopped by SIGTERM at step 5" in last_line(capsys.readouterr().err)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 75), (signal.SIGUSR1, 75)])
def test_preemption_signals_save_and_exit_for_a_requeue(synth, tmp_path, monkeypatch, capsys, signum, status):
    cfg = tiny_config(synth, max_steps=10, ckpt_every=2, log_every=100)
    signal_at_call(monkeypatch, 4, signum)
    with pytest.raises(SystemExit) as stopped:
        train_xmdpt.train(cfg, tmp_path)
    assert stopped.value.code == status and steps_saved(tmp_path) == [2, 4]
    assert f"stopped by {signal.Signals(signum).name} at step 4" in capsys.readouterr().err


# ---- a real training process, killed -------------------------------------------------------------------------

KILL_STEPS = 16
EXIT_STATUS = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 75}
ONE_THREAD = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def logged_steps(out):
    path = Path(out) / "log.csv"
    return [int(r["step"]) for r in read_log(out)] if path.is_file() else []


def staged_files(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").glob(".*"))


def kill_and_resume(cfg_path, out, kills, rng):
    """Run train_xmdpt.py on `cfg_path` as a user does, and for each (signal, aim) of `kills`: wait until it has
    trained a step past its checkpoint, then send the signal either some time (drawn from `rng`) into the steps
    that follow ("mid-step") or the moment a checkpoint is being written ("mid-save"); then resume it (--resume).
    The last run is let finish. Returns, for each kill, (the last step logged, the step resumed from, the staged
    files it left)."""
    env = dict(os.environ, **ONE_THREAD)
    cmd = [sys.executable, "train_xmdpt.py", "--config", str(cfg_path), "--out", str(out), "--resume"]
    records = []
    for signum, aim in [*kills, (None, None)]:
        checkpoints = steps_saved(out)
        resumed_from = checkpoints[-1] if checkpoints else 0
        before = logged_steps(out)  # a killed run may have logged a step it did not save: wait for this run's own
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if signum is None:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
            break
        deadline = time.time() + 120
        while not ((steps := logged_steps(out)) != before and steps and steps[-1] > resumed_from) \
                and proc.poll() is None:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.01)
        if aim == "mid-step":
            time.sleep(rng.uniform(0, 0.3))
        else:
            while not staged_files(out) and proc.poll() is None:
                time.sleep(0.001)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        os.kill(proc.pid, signum)
        status = proc.wait(timeout=120)
        assert status == EXIT_STATUS[signum], proc.stderr.read()[-3000:]
        left = staged_files(out)
        resumable = steps_saved(out)[-1] if steps_saved(out) else 0
        records.append((logged_steps(out)[-1], resumable, left))
    return records


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory):
    """The tiny config's runs, never interrupted, per seed (side by side, one thread each): (config file, run
    directory)."""
    runs, procs = {}, []
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"uninterrupted{seed}")
        cfg = tiny_config(synth, max_steps=KILL_STEPS, ckpt_every=1, log_every=1, keep_last=2, seed=seed)
        (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([sys.executable, "train_xmdpt.py", "--config", str(folder / "cfg.yaml"),
                                       "--out", str(folder / "run")], cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, env=dict(os.environ, **ONE_THREAD)))
        runs[seed] = folder / "cfg.yaml", folder / "run"
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return runs


# Each signal kills a run once per seed, and between the two seeds both mid-step and mid-save.
KILLS = {0: [(signal.SIGKILL, "mid-step"), (signal.SIGINT, "mid-save"), (signal.SIGTERM, "mid-step")],
         1: [(signal.SIGKILL, "mid-save"), (signal.SIGINT, "mid-step"), (signal.SIGTERM, "mid-save")]}


@pytest.mark.slow
def test_a_killed_run_resumed_ends_as_one_never_killed(uninterrupted, tmp_path):
    """Real training processes (one thread each; the two seeds' runs side by side, one a core), a checkpoint
    every step, killed with SIGKILL, then SIGINT, then SIGTERM (KILLS: mid-step or mid-save), resumed each time.
    At the end the model and EMA weights equal the uninterrupted run's bit for bit, and so does every log row;
    no staged file is left, and every checkpoint on disk loads. After SIGINT and SIGTERM no step is repeated and
    no staged file was left: the checkpoint is the step that was running."""
    with ThreadPoolExecutor(len(KILLS)) as pool:
        chains = {seed: pool.submit(kill_and_resume, uninterrupted[seed][0], tmp_path / f"run{seed}", kills,
                                    random.Random(seed)) for seed, kills in KILLS.items()}
        records = {seed: chain.result() for seed, chain in chains.items()}
    for seed, kills in KILLS.items():
        out, reference = tmp_path / f"run{seed}", uninterrupted[seed][1]
        final = f"checkpoints/{KILL_STEPS:07d}.pt"
        got, want = (torch.load(run / final, weights_only=True) for run in (out, reference))
        largest = max((got[part][k] - want[part][k]).abs().max().item() for part in ("model", "ema")
                      for k in want[part])
        assert largest == 0.0
        assert all(torch.equal(got[part][k], want[part][k]) for part in ("model", "ema") for k in want[part])
        strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]
        assert strip(read_log(out)) == strip(read_log(reference))
        assert staged_files(out) == [] and not list(out.rglob("*.partial"))
        for step in steps_saved(out):
            assert load_checkpoint(out / "checkpoints" / f"{step:07d}.pt") is not None
        repeated = [logged - resumable for logged, resumable, _ in records[seed]]
        for (signum, _), (_, _, left), steps in zip(kills, records[seed], repeated):
            if signum != signal.SIGKILL:
                assert steps == 0 and not left, signal.Signals(signum).name
        print(f"\nseed {seed}: kills {[(signal.Signals(s).name, aim) for s, aim in kills]}, staged files left by "
              f"each {[bool(left) for *_, left in records[seed]]}, steps repeated {repeated}, largest weight "
              f"difference {largest}")


def test_checkpoints_kept_are_the_newest_and_the_milestones(synth, tmp_path):
    """train.keep_last=2, train.keep_every=8, a checkpoint every 2 steps for 20 steps: 8, 16, 18 and 20 are
    left; each loads."""
    cfg = tiny_config(synth, max_steps=20, ckpt_every=2, log_every=20, keep_last=2, keep_every=8)
    train_xmdpt.train(cfg, tmp_path)
    assert steps_saved(tmp_path) == [8, 16, 18, 20]
    for step in steps_saved(tmp_path):
        assert load_checkpoint(tmp_path / "checkpoints" / f"{step:07d}.pt").config == model_config(cfg)


def test_a_checkpoint_that_will_not_fit_stops_the_run_and_keeps_the_last_good_one(synth, tmp_path, monkeypatch,
                                                                                 capsys):
    """The free space is checked before each save: with room for two checkpoints only, the third stops the run
    with one line naming the folder, the bytes needed and free, and the last good checkpoint; nothing is lost."""
    cfg = tiny_config(synth, max_steps=10, ckpt_every=1, log_every=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    real, checks = shutil.disk_usage, []

    def two_checkpoints_of_room(path):
        checks.append(path)
        usage = real(path)
        return usage._replace(free=usage.free if len(checks) <= 2 else 4096)

    monkeypatch.setattr("training.checkpoints.shutil.disk_usage", two_checkpoints_of_room)
    with pytest.raises(SystemExit) as stopped:
        train_xmdpt.main(["--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    assert stopped.value.code == 2 and steps_saved(tmp_path / "run") == [1, 2]
    folder = tmp_path / "run" / "checkpoints"
    assert re.fullmatch(rf"train_xmdpt.py: error: no room in {folder} for the checkpoint of step 3: it needs "
                        rf"[0-9,]+ bytes and 4,096 are free; stopping, with the last good checkpoint kept "
                        rf"\({folder}/0000002.pt\)\. .*--resume", last_line(capsys.readouterr().err))
    assert not list(folder.glob(".*")) and load_checkpoint(folder / "0000002.pt")


def test_a_truncated_checkpoint_ends_resume_in_one_line(synth, tmp_path, capsys):
    cfg = tiny_config(synth, max_steps=2, ckpt_every=1, log_every=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train_xmdpt.main(["--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    newest = tmp_path / "run" / "checkpoints" / "0000002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        train_xmdpt.main(["--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--resume",
                          "--max-steps", "3"])
    assert stopped.value.code == 2
    assert re.fullmatch(rf"train_xmdpt.py: error: checkpoint {newest} is incomplete or corrupt \(.*\)\n",
                        capsys.readouterr().err)


def test_clear_errors_before_training(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_pairs.txt"):
        train_xmdpt.train(tiny_config(tmp_path / "missing"), tmp_path / "a")
    cfg = tiny_config(synth)
    cfg["encoders"]["pose"]["weights"] = str(tmp_path / "dinov2_vitb14_pretrain.pth")
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
        train_xmdpt.train(cfg, tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="feature cache"):
        train_xmdpt.train(tiny_config(synth, tmp_path / "nocache"), tmp_path / "c")
    bad = yaml.safe_load(open(ROOT / "configs/demo.yaml"))
    del bad["train"]["lr"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="missing keys in section 'train': lr"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        load_config(ROOT / "configs/demo.yaml", ["train.lrr=1"])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["X-MDPT", "distillation", "DMD2"])
def test_two_processes_with_gloo(synth, tiny_teacher, tmp_path, objective):
    """Each objective on two processes; DMD2's student learns at steps 1 and 3 only (ratio 2), which
    DistributedDataParallel must be told of."""
    make = {"X-MDPT": tiny_config, "distillation": partial(distill_config, teacher=tiny_teacher),
            "DMD2": partial(dmd2_config, teacher=tiny_teacher)}[objective]
    cfg = make(synth, max_steps=3, ckpt_every=3, log_every=1)
    if objective == "DMD2":
        cfg["distill"]["ratio"] = 2
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_xmdpt.py"), "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert all(np.isfinite(float(r["total"])) for r in rows)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert len(ckpt["process"]) == 2


def child_of_rank(parent, rank):
    """The pid of the process torchrun (`parent`) started for `rank`, read from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                    f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError(f"no process of rank {rank} under {parent}")


@pytest.mark.slow
def test_under_torchrun_every_process_stops_at_the_same_step(synth, tmp_path):
    """SIGUSR1 to one of two processes (as a cluster may deliver it): both stop after the same step, and its
    checkpoint holds both processes' states."""
    cfg = tiny_config(synth, max_steps=500, ckpt_every=1000, log_every=1)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_xmdpt.py"), "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(logged_steps(tmp_path / "run")) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.05)
    os.kill(child_of_rank(proc.pid, 1), signal.SIGUSR1)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    (step,) = steps_saved(tmp_path / "run")
    assert f"stopped by SIGUSR1 at step {step}, with its checkpoint" in err and step < 500
    assert logged_steps(tmp_path / "run")[-1] == step
    assert len(torch.load(tmp_path / "run" / "checkpoints" / f"{step:07d}.pt", weights_only=True)["process"]) == 2


def test_distillation_is_a_run_like_any_other(synth, tiny_teacher, tmp_path):
    """configs/distill_demo.yaml's objective in the same loop: the student and its EMA start from the teacher's
    weights, the log's columns are the objective's terms, and a run stopped at step 2 and resumed ends as the
    run of 4 steps does, bit for bit."""
    cfg = distill_config(synth, tiny_teacher, max_steps=4, ckpt_every=2, log_every=1)
    model, ema = train_xmdpt.train(cfg, tmp_path / "full")
    assert list(read_log(tmp_path / "full")[0]) == ["step", "total", "huber", "mse", "lr", "steps_per_s"]
    teacher = load_checkpoint(tiny_teacher)
    moved = [not torch.equal(p, teacher.state_dict()[k]) for k, p in model.state_dict().items()]
    assert model.consistency and any(moved)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "0000002.pt", tmp_path / "resumed" / "checkpoints")
    resumed, resumed_ema = train_xmdpt.train(cfg, tmp_path / "resumed", resume=True)
    for a, b in ((model, resumed), (ema, resumed_ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    first = train_xmdpt.train(distill_config(synth, tiny_teacher, max_steps=0), tmp_path / "start")[0]
    assert all(torch.equal(p, teacher.state_dict()[k]) for k, p in first.state_dict().items())


def objective_state(run, step):
    """The fake score, head, optimizer and update count a DMD2 checkpoint holds."""
    return torch.load(Path(run) / "checkpoints" / f"{step:07d}.pt", weights_only=True)["objective"]


def test_dmd2_is_a_run_like_any_other(synth, tiny_teacher, tmp_path):
    """configs/dmd2_demo.yaml's objective in the same loop (ratio 3: the student learns at steps 1 and 4): the
    log's columns are its terms, the student's left empty at the steps it does not learn, and a run stopped at
    step 2 and resumed ends as the run of 5 steps does, bit for bit: student, EMA, fake score, head, their
    optimizer and the count of their updates, and the log."""
    cfg = dmd2_config(synth, tiny_teacher, max_steps=5, ckpt_every=2, log_every=1)
    cfg["distill"]["ratio"] = 3
    model, ema = train_xmdpt.train(cfg, tmp_path / "full")
    rows = read_log(tmp_path / "full")
    assert list(rows[0]) == ["step", "total", "dm", "gan", "fake", "head", "lr", "steps_per_s"]
    assert [bool(r["dm"]) and bool(r["gan"]) for r in rows] == [True, False, False, True, False]
    assert all(r["fake"] and r["head"] for r in rows)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "0000002.pt", tmp_path / "resumed" / "checkpoints")
    shutil.copy(tmp_path / "full" / "log.csv", tmp_path / "resumed")
    resumed, resumed_ema = train_xmdpt.train(cfg, tmp_path / "resumed", resume=True)
    for a, b in ((model, resumed), (ema, resumed_ema)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    full, again = objective_state(tmp_path / "full", 5), objective_state(tmp_path / "resumed", 5)
    assert full["updates"] == again["updates"] == 5
    for part in ("fake_score", "head"):
        assert all(torch.equal(full[part][k], again[part][k]) for k in full[part])
    assert str(full["optimizer"]) == str(again["optimizer"])
    strip = lambda log: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in log]
    assert strip(read_log(tmp_path / "resumed")) == strip(rows)


def test_dmd2_starts_the_student_from_its_checkpoint_and_the_fake_score_from_the_teacher(synth, tiny_teacher,
                                                                                        tmp_path):
    """distill.student (a consistency student, say) is where the student starts; without, the teacher's weights;
    the fake score always starts as the teacher, which stays frozen."""
    from training.recipes import build_objective
    cfg = dmd2_config(synth, tiny_teacher)
    torch.manual_seed(3)
    student = XMDPT(model_config(cfg))
    for p in student.parameters():
        p.data.normal_(0, 0.05)
    export(student, tmp_path / "student")
    teacher = load_checkpoint(tiny_teacher).state_dict()
    for start, expected in ((tmp_path / "student", student.state_dict()), (None, teacher)):
        model = XMDPT(model_config(cfg))
        objective = build_objective(dmd2_config(synth, tiny_teacher, start), model, XMDPT(model.config))
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert all(torch.equal(v, teacher[k]) for k, v in objective.fake_score.state_dict().items())
        assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_a_distillation_config_must_describe_a_consistency_student(synth, tiny_teacher, tmp_path):
    for override, message in [("model.consistency=false", "set model.consistency: true and model.mipnet: none"),
                              ("model.mipnet=self-cross", "set model.consistency: true and model.mipnet: none"),
                              ("distill.loss=l1", "distill.loss must be one of huber, l2"),
                              ("distill.weighting=snr", "distill.weighting must be one of uniform, ict"),
                              ("distill.teachr=x", "unknown key 'teachr' in section 'distill'"),
                              ("distill.method=gan", "distill.method must be one of consistency, dmd2, got 'gan'")]:
        with pytest.raises(InputError, match=message):
            load_config(ROOT / "configs/distill_demo.yaml", [override])
    with pytest.raises(InputError, match="model.consistency: true needs a distill section"):
        load_config(ROOT / "configs/demo.yaml", ["model.consistency=true"])
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(f"base: {ROOT / 'configs/distill_demo.yaml'}\ndistill:\n  teachr: x\n")
    with pytest.raises(InputError, match="unknown keys in section 'distill' for method consistency: teachr"):
        load_config(misspelt)
    bare = tmp_path / "bare.yaml"  # a dmd2 section needs its method's keys
    bare.write_text(f"base: {ROOT / 'configs/demo.yaml'}\nmodel: {{mipnet: none, consistency: true}}\n"
                    f"distill: {{method: dmd2, teacher: x, cfg_scale: 2.0, scale_pow: 0.01}}\n")
    with pytest.raises(InputError, match="missing keys in section 'distill': fake_lr, gan_weight, head_weight, "
                                         "ratio, student"):
        load_config(bare)
    other = distill_config(synth, tiny_teacher, max_steps=1)
    other["model"]["hidden_size"] = 64
    with pytest.raises(InputError, match=r"(?s)distill.teacher .*teacher does not fit the student .*hidden_size: 32 "
                                         r"in the checkpoint, 64"):
        train_xmdpt.train(other, tmp_path)


@pytest.mark.slow
def test_the_distillation_loss_falls_on_the_demo_set(synth, demo_cache, tmp_path):
    """configs/distill_demo.yaml as it is, distilling the bundled demo model on the synthetic set (its feature
    cache): after 40 steps the loss is well below that of the first steps."""
    cfg = load_config(ROOT / "configs/distill_demo.yaml", [f"data.root={synth}", f"data.cache={demo_cache}",
                                                          "train.sample_every=0", f"distill.teacher={DEMO_TEACHER}"])
    cfg["train"].update(max_steps=40, log_every=1, ckpt_every=40)
    train_xmdpt.train(cfg, tmp_path)
    losses = [float(r["total"]) for r in read_log(tmp_path)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses


def test_run_train_sh_trains_as_a_user_types_it(synth, tmp_path):
    """`bash run_train.sh`, with the CONFIG and OUT it reads from the environment and overrides passed on."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_config(synth)))
    env = dict(os.environ, CONFIG=str(tmp_path / "cfg.yaml"), OUT=str(tmp_path / "run"), OMP_NUM_THREADS="1")
    subprocess.run(["bash", "run_train.sh", "--max-steps", "2", "--log-every", "1", "train.lr=5e-4"], cwd=ROOT,
                   env=env, check=True, capture_output=True, text=True, timeout=300)
    assert [r["step"] for r in read_log(tmp_path / "run")] == ["1", "2"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["run_config"]["train"]["lr"] == 5e-4 and ckpt["opt"]["param_groups"][0]["lr"] == 5e-4


def test_run_train_sh_reports_user_errors_in_one_line(synth, tmp_path):
    """`bash run_train.sh` (the paper's recipe) on a machine without DeepFashion, without the weights, or with a
    mistyped override (the three side by side): one line that names the file (and the command that makes it) or
    the key, exit status 2."""
    cases = {
        "no dataset": ([f"data.root={tmp_path}/deepfashion"],
                       rf"pair file not found: {tmp_path}/deepfashion/train_pairs.txt\. .*python -m "
                       rf"scripts.prepare_deepfashion --root {tmp_path}/deepfashion"),
        "no weights": ([f"data.root={synth}", f"data.size={SIZE}", f"encoders.pose.weights={tmp_path}/vitb14.pth"],
                       rf"DINOv2 vitb14 weights not found: {tmp_path}/vitb14.pth\. Get the original checkpoint from "
                       r"https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"),
        "bad override": (["train.lrr=1e-4"], r"override 'train.lrr=1e-4': unknown key 'lrr' in section 'train'"),
    }
    runs = {case: subprocess.Popen(["bash", "run_train.sh", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, OUT=str(tmp_path / case), **ONE_THREAD))
            for case, (argv, _) in cases.items()}
    for case, (_, message) in cases.items():
        _, err = runs[case].communicate(timeout=120)
        assert runs[case].returncode == 2, (case, err[-2000:])
        assert re.fullmatch(rf"train_xmdpt.py: error: {message}.*\n", err), (case, err)


def test_overrides_read_exponents_as_floats(tmp_path):
    """`train.lr=1e-3` (YAML 1.1 would give the string '1e-3') is a float, in overrides and in files."""
    cfg = load_config(ROOT / "configs/demo.yaml", ["train.lr=1e-3", "train.weight_decay=5E+0", "data.root=1e3x"])
    assert cfg["train"]["lr"] == 1e-3 and cfg["train"]["weight_decay"] == 5.0 and cfg["data"]["root"] == "1e3x"
    (tmp_path / "c.yaml").write_text("base: " + str(ROOT / "configs/demo.yaml") + "\ntrain:\n  lr: 2e-4\n")
    assert load_config(tmp_path / "c.yaml")["train"]["lr"] == 2e-4


# ---- the objective and the optimizer step ----------------------------------------------------------------

def tiny_model(**kw):
    arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, pose_dim=16,
                image_dim=24, dino_tokens=5, cond_drop=0.0)
    model = XMDPT(**dict(arch, **kw))
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, 0.1)  # a fresh model outputs zeros, and most of its gradients are zero
    return model


def tiny_batch(model, n=3):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 4, 8, 8, generator=g) * 2 - 1, torch.randn(n, 5, 16, generator=g),
            torch.randn(n, 5, 24, generator=g), torch.randn(n, 4, 8, 8, generator=g))


def test_objective_total_is_the_plain_plus_the_masked_loss():
    """The masked (MIPNet) forward's loss enters the total that is back-propagated, with its own t, noise
    and masking replayed from the same random numbers the objective drew."""
    model = tiny_model()
    x0, pose, image, source = tiny_batch(model)
    diffusion = Diffusion()
    torch.manual_seed(7)
    terms = XMDPTLoss(model, diffusion)(x0, dict(pose=pose, image=image, source=source))
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn(x0.shape)
    mask_noise = torch.rand(3, model.num_patches)
    cond = dict(pose=pose, image=image, source=source)
    plain = diffusion.training_losses(model, x0, t, cond, noise)["loss"].mean()
    masked = diffusion.training_losses(model, x0, t, dict(cond, mask=True, mask_noise=mask_noise), noise)["loss"].mean()
    torch.testing.assert_close(terms["plain_loss"], plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["masked_loss"], masked, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["total"], plain + masked, rtol=1e-6, atol=0)
    params = [p for p in model.parameters()]
    got = torch.autograd.grad(terms["total"], params, allow_unused=True)
    want = torch.autograd.grad(plain + masked, params, allow_unused=True)
    for name, a, b in zip(dict(model.named_parameters()), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    mask_token = next(i for i, p in enumerate(params) if p is model.mipnet.mask_token)
    assert got[mask_token].abs().sum() > 0  # MIPNet trains through the total


def test_objective_without_mipnet_is_the_plain_loss():
    """The DiT ablation (mipnet='none'): one plain forward, no masked term."""
    model = tiny_model(mipnet="none")
    x0, pose, image, source = tiny_batch(model)
    torch.manual_seed(7)
    terms = XMDPTLoss(model, Diffusion())(x0, dict(pose=pose, image=image, source=source))
    assert sorted(terms) == ["plain_loss", "plain_mse", "plain_vb", "total"]
    assert torch.equal(terms["total"], terms["plain_loss"])


def run_recording(synth, tmp_path, monkeypatch, **train):
    """Train the tiny config for 2 steps, recording the gradient of every objective call's total (taken
    before the loop's own backward) and the gradients the optimizer applies at each step."""
    cfg = tiny_config(synth, max_steps=2, log_every=1, ckpt_every=1, **train)
    real = XMDPTLoss.forward
    per_call, applied = [], []

    def recording(self, *args):
        terms = real(self, *args)
        params = [p for p in self.model.parameters() if p.requires_grad]
        per_call.append(torch.autograd.grad(terms["total"], params, retain_graph=True, allow_unused=True))
        return terms

    def before_step(opt, args, kwargs):
        applied.append([p.grad.clone() for group in opt.param_groups for p in group["params"]])

    monkeypatch.setattr(XMDPTLoss, "forward", recording)
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train_xmdpt.train(cfg, tmp_path)
    finally:
        handle.remove()
    return cfg, per_call, applied


def flat(grads):
    return torch.cat([g.flatten() for g in grads if g is not None])


@pytest.mark.parametrize("accum, clip", [(1, None), (2, None), (2, 1e-3)])
def test_optimizer_applies_the_mean_gradient_of_the_micro_batches_clipped(synth, tmp_path, monkeypatch, accum,
                                                                         clip):
    """With grad_accum k the applied gradient is the mean of the k micro-batches' gradients of the total
    loss (each micro-batch holding global_batch / k samples); with grad_clip its norm is at most the clip,
    its direction unchanged (torch's clip_grad_norm_: scale min(1, clip / (norm + 1e-6)))."""
    _, per_call, applied = run_recording(synth, tmp_path, monkeypatch, grad_accum=accum, grad_clip=clip)
    assert len(per_call) == 2 * accum and len(applied) == 2
    for step in range(2):
        mean = sum(flat(g) for g in per_call[step * accum:(step + 1) * accum]) / accum
        expected = mean * min(1.0, clip / (mean.norm().item() + 1e-6)) if clip else mean
        torch.testing.assert_close(flat(applied[step]), expected, rtol=1e-5, atol=1e-9)
        if clip:
            assert mean.norm() > 10 * clip and flat(applied[step]).norm() == pytest.approx(clip, rel=1e-4)


def test_ema_moves_towards_the_weights_by_one_minus_decay(synth, tmp_path):
    """ema_k = decay * ema_(k-1) + (1 - decay) * weights_k after every optimizer step."""
    cfg = tiny_config(synth, max_steps=2, log_every=1, ckpt_every=1, ema=0.9)
    train_xmdpt.train(cfg, tmp_path)
    first, second = (torch.load(tmp_path / "checkpoints" / f"000000{k}.pt", weights_only=True) for k in (1, 2))
    for key, ema in second["ema"].items():
        expected = 0.9 * first["ema"][key] + 0.1 * second["model"][key]
        torch.testing.assert_close(ema, expected, rtol=1e-5, atol=1e-7)
    gap = max((second["model"][k] - first["ema"][k]).abs().max().item() for k in second["ema"])
    assert gap > 1e-3  # the weights did move away from the EMA, so a wrong decay would show


@pytest.mark.cuda
def test_training_step_never_waits_for_the_device(synth, tmp_path, monkeypatch):
    """After a warm-up step, a training step makes no synchronising CUDA call (torch's sync debug mode turns
    one into an error): losses stay on the device until a log row."""
    cfg = tiny_config(synth, max_steps=3, log_every=100, ckpt_every=100)
    real, calls = XMDPTLoss.forward, []

    def watched(self, *args):  # sync debug mode from the second step's objective to the third's
        calls.append(1)
        if len(calls) == 2:
            torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if len(calls) == 2 else "default")
        return real(self, *args)

    monkeypatch.setattr(XMDPTLoss, "forward", watched)
    try:
        train_xmdpt.train(cfg, tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 3
