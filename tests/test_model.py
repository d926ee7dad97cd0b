"""Parity with the released X-MDPT code (fixture official_parity_small.pt), sizes, switches and errors."""
import pytest
import torch

from models import XMDPT, XMDPT_CONFIGS, Diffusion, load_checkpoint, save_safetensors
from models.checkpoint import convert_released_state_dict

TOL = 1e-4


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def as_float(d):
    return {k: v.float() if v.is_floating_point() else v for k, v in d.items()}


@pytest.fixture(scope="module")
def ref(parity):
    model = load_checkpoint(as_float(parity["state_dict"]))
    inputs = as_float(parity["inputs"])
    cond = dict(pose=inputs["dino_tgt_pose"], image=inputs["dino_src_img"], source=inputs["src_img"])
    return model, inputs, cond, parity["outputs"]


def keep(n):
    return torch.zeros(n, dtype=torch.bool)


@torch.no_grad()
@pytest.mark.parametrize("name", ["cond", "uncond", "masked", "cfg"])
def test_forward_parity(ref, name):
    model, x, cond, out = ref
    if name == "cfg":
        got = model.forward_with_cfg(x["x"], x["t"], **cond, cfg_scale=2.0, scale_pow=0.01)
    else:
        got = model(x["x"], x["t"], **cond, drop_cond=keep(2) if name != "uncond" else ~keep(2),
                    mask=name == "masked", mask_noise=x["mask_noise"] if name == "masked" else None)
    assert got.shape == out[name].shape
    assert rel_err(got, out[name]) < TOL


@torch.no_grad()
@pytest.mark.parametrize("masked", [False, True])
def test_training_loss_parity(ref, masked):
    model, x, cond, out = ref
    kwargs = dict(cond, drop_cond=keep(2), mask=masked, mask_noise=x["mask_noise"] if masked else None)
    losses = Diffusion().training_losses(model, x["x"], x["t"], kwargs, noise=x["noise"])
    expected = out["loss_masked" if masked else "loss_plain"]
    for key in ("mse", "vb", "loss"):
        assert rel_err(losses[key], expected[key]) < TOL, key


@torch.no_grad()
def test_ddim_sample_parity(ref):
    model, x, cond, out = ref
    fn = model.guided(**cond, cfg_scale=2.0, scale_pow=0.01)
    samples = Diffusion().ddim_sample(fn, x["z"], steps=50)
    assert rel_err(samples, out["ddim_samples"]) < TOL


def test_released_keys_convert_strictly(parity):
    converted = convert_released_state_dict(parity["state_dict"])
    model = XMDPT(**load_checkpoint(as_float(parity["state_dict"])).arch)
    assert set(converted) == set(model.state_dict())
    broken = dict(parity["state_dict"])
    broken["blocks.0.attn.rel_pos_bias.relative_position_index"] = torch.zeros(256, 256, dtype=torch.long)
    with pytest.raises(ValueError, match="relative_position_index"):
        convert_released_state_dict(broken)


def count(model, skip_mipnet=False):
    return sum(p.numel() for n, p in model.named_parameters() if not (skip_mipnet and n.startswith("mipnet.")))


def test_parameter_counts_match_released():
    small = XMDPT(**XMDPT_CONFIGS["XMDPT-S/2"])
    assert count(small) == 39_117_301
    assert round(count(small, True) / 1e6, 2) == 33.79
    base = XMDPT(**XMDPT_CONFIGS["XMDPT-B/2"])
    assert count(base) == 153_731_269
    assert round(count(base, True) / 1e6, 2) == 132.45


@pytest.mark.slow
def test_parameter_count_large():
    assert round(count(XMDPT(**XMDPT_CONFIGS["XMDPT-L/2"]), True) / 1e6, 2) == 461.13


def tiny(**kw):
    arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                pose_dim=16, image_dim=24, dino_tokens=5)
    arch.update(kw)
    return XMDPT(**arch)


def inputs(model, n=2):
    a = model.arch
    s = a["input_size"]
    return (torch.randn(n, a["in_channels"], s, s), torch.randint(0, 1000, (n,)),
            dict(pose=torch.randn(n, a["dino_tokens"], a["pose_dim"]),
                 image=torch.randn(n, a["dino_tokens"], a["image_dim"]),
                 source=torch.randn(n, a["in_channels"], s, s)))


def test_512_shapes():
    model = XMDPT(**dict(XMDPT_CONFIGS["XMDPT-S/2"], input_size=64, depth=3))
    assert model.num_patches == 1024
    assert model.canet.local.pool[0].weight.shape == (1, 1024, 1)
    x, t, cond = inputs(model, 1)
    with torch.no_grad():
        assert model(x, t, **cond).shape == (1, 8, 64, 64)
        assert model(x, t, **cond, mask=True).shape == (1, 8, 64, 64)


@pytest.mark.parametrize("mipnet", ["none", "self", "cross", "cross-self", "self-cross"])
@pytest.mark.parametrize("aggregation", ["local", "global", "add", "mlp"])
def test_ablation_switches(mipnet, aggregation):
    model = tiny(mipnet=mipnet, aggregation=aggregation, mask_ratio=0.5)
    x, t, cond = inputs(model)
    out = model(x, t, **cond)
    assert out.shape == (2, 8, 8, 8)
    if mipnet == "none":
        assert model.mipnet is None
        with pytest.raises(ValueError, match="mipnet='none'"):
            model(x, t, **cond, mask=True)
    else:
        out = model(x, t, **cond, mask=True)
        out.mean().backward()
        assert out.shape == (2, 8, 8, 8)
    reloaded = load_checkpoint(model.state_dict(), arch=model.arch)
    assert reloaded.arch == model.arch


def test_mask_keeps_smallest_noise_and_ratio():
    model = tiny(mask_ratio=0.3)
    tokens = torch.randn(2, 16, 32)
    noise = torch.rand(2, 16)
    kept, ids = model.mipnet.mask(tokens, noise)
    assert kept.shape == (2, int(16 * 0.7), 32)
    assert torch.equal(ids.sort(1).values, noise.argsort(1)[:, :11].sort(1).values)


def test_source_path_gets_no_gradient():
    torch.manual_seed(0)
    model = tiny()
    x, t, cond = inputs(model)
    cond["source"].requires_grad_(True)
    model(x, t, **cond, drop_cond=torch.ones(2, dtype=torch.bool), mask=True).sum().backward()
    assert cond["source"].grad is None or cond["source"].grad.abs().sum() == 0


def test_relative_bias_is_cached_without_grad():
    model = tiny()
    bias = model.tdnet.blocks[0].attn.rel_pos_bias
    with torch.no_grad():
        first = bias()
        assert bias() is first
        bias.table.add_(1.0)
        assert bias() is not first
    assert bias().requires_grad


def test_guided_equals_two_separate_forwards():
    torch.manual_seed(0)
    model = tiny().eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, cond = inputs(model)
    with torch.no_grad():
        c = model(x, t, **cond, drop_cond=torch.zeros(2, dtype=torch.bool))
        u = model(x, t, **cond, drop_cond=torch.ones(2, dtype=torch.bool))
        s = 1 + (3.0 - 1) * (1 - torch.cos(torch.pi * (1 - t / 1000) ** 0.5)) / 2
        expected = u + s.view(-1, 1, 1, 1) * (c - u)
        assert rel_err(model.forward_with_cfg(x, t, **cond, cfg_scale=3.0, scale_pow=0.5), expected) < 1e-5


def test_train_mode_drops_condition_randomly():
    torch.manual_seed(0)
    model = tiny(cond_drop=1.0)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t, cond = inputs(model)
    with torch.no_grad():
        dropped = model.train()(x, t, **cond)
        uncond = model.eval()(x, t, **cond, drop_cond=torch.ones(2, dtype=torch.bool))
    assert torch.allclose(dropped, uncond)


@pytest.mark.parametrize("arg, change, message", [
    ("x", lambda a: a[:, :3], "x must have shape"),
    ("t", lambda a: a[:1], "t must have shape"),
    ("t", lambda a: a + 1000, r"t must lie in \[0, 999\]"),
    ("pose", lambda a: a[:, :4], "pose must have shape"),
    ("image", lambda a: a[..., :5], "image must have shape"),
    ("source", lambda a: a[..., :4, :4], "source must have shape"),
])
def test_bad_inputs_name_the_argument(arg, change, message):
    model = tiny()
    x, t, cond = inputs(model)
    args = dict(x=x, t=t, **cond)
    args[arg] = change(args[arg])
    with pytest.raises(ValueError, match=message):
        model(**args)


@pytest.mark.parametrize("kw, message", [
    (dict(mipnet="cross-cross"), "mipnet must be one of"),
    (dict(aggregation="concat"), "aggregation must be one of"),
    (dict(mask_ratio=1.5), "mask_ratio"),
    (dict(decode_layer=3), "decode_layer"),
    (dict(input_size=9), "input_size"),
    (dict(prediction="x0"), "prediction must be one of"),
])
def test_bad_switches(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_checkpoint_of_another_size_fails_listing_keys(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="shape mismatches .*tdnet.pos_embed"):
        load_checkpoint(model.state_dict(), model=tiny(hidden_size=64))
    with pytest.raises(ValueError, match="missing keys .*tdnet.blocks.3"):
        load_checkpoint(model.state_dict(), model=tiny(depth=4))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_training_checkpoint_and_safetensors_roundtrip(tmp_path):
    torch.manual_seed(0)
    model, ema = tiny(), tiny()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "arch": model.arch}, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()))
    raw = load_checkpoint(tmp_path / "c.pt", use_ema=False)
    assert all(torch.equal(a, b) for a, b in zip(raw.state_dict().values(), model.state_dict().values()))
    save_safetensors(model, tmp_path / "w.safetensors")
    again = load_checkpoint(tmp_path / "w.safetensors")
    assert again.arch == model.arch
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
