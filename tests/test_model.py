"""Parity with the released X-MDPT code (fixture official_parity_small.pt), sizes, switches and errors."""
import json
from dataclasses import fields, replace

import pytest
import torch

from data.errors import InputError
from models import XMDPT, XMDPT_CONFIGS, Diffusion, XMDPTConfig, export, load_checkpoint
from models.weights import check_fits, convert_released_state_dict, read_checkpoint
from models.xmdpt import TRAINING_ONLY

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


def test_initialisation_matches_the_released_one(released_init):
    """The entries the released initialisation fixes (equal under two seeds: sin-cos position embeddings,
    zero-initialised layers, LayerNorm scales) are the same entries in ours, with the same values."""
    config = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=96, depth=4, num_heads=4,
                  mask_ratio=0.3, decode_layer=2)

    def built(seed):
        torch.manual_seed(seed)
        return XMDPT(**config).state_dict()

    first, second = built(released_init["seed"]), built(released_init["seed"] + 1)
    fixed = {k for k, v in first.items() if v.is_floating_point() and torch.equal(v, second[k])}
    released = convert_released_state_dict(released_init["deterministic"])
    assert fixed == set(released) and len(fixed) == 61
    for key, value in released.items():
        assert torch.allclose(first[key], value.float(), rtol=1e-4, atol=1e-6), key
    zeros = convert_released_state_dict({k: released_init["deterministic"][k] for k in released_init["zero_keys"]})
    assert all(not first[key].any() for key in zeros)


def test_released_keys_convert_strictly(parity):
    converted = convert_released_state_dict(parity["state_dict"])
    model = XMDPT(load_checkpoint(as_float(parity["state_dict"])).config)
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
    with torch.device("meta"):  # shapes only: no memory, no time
        model = XMDPT(**XMDPT_CONFIGS["XMDPT-L/2"])
    assert round(count(model, True) / 1e6, 2) == 461.13


def tiny(**kw):
    arch = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                pose_dim=16, image_dim=24, dino_tokens=5)
    arch.update(kw)
    return XMDPT(**arch)


def inputs(model, n=2):
    a = model.config
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
    reloaded = load_checkpoint(model.state_dict(), config=model.config)
    assert reloaded.config == model.config


def randomised(model, std=0.1):
    """Every weight redrawn (a fresh model outputs zeros: its last layer and modulations start at zero)."""
    torch.manual_seed(1)
    for p in model.parameters():
        p.data.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("attention, order", [("self", ["self"]), ("cross", ["cross"]),
                                              ("self-cross", ["self", "cross"]), ("cross-self", ["cross", "self"])])
def test_mipnet_runs_its_blocks_in_the_named_order(attention, order):
    model = randomised(tiny(mipnet=attention))
    calls = []
    for name in ("self", "cross"):
        block = getattr(model.mipnet, f"{name}_block")
        assert (block is not None) == (name in order)
        if block is not None:
            block.register_forward_hook(lambda *_, name=name: calls.append(name))
    x, t, cond = inputs(model)
    with torch.no_grad():
        model(x, t, **cond, mask=True)
    assert calls == order


def test_mipnet_block_order_changes_the_output():
    """self-cross and cross-self with the same weights differ: the order is not cosmetic."""
    a = randomised(tiny(mipnet="self-cross"))
    b = tiny(mipnet="cross-self")
    b.load_state_dict(a.state_dict())
    x, t, cond = inputs(a)
    with torch.no_grad():
        assert rel_err(a(x, t, **cond, mask=True), b.eval()(x, t, **cond, mask=True)) > 1e-2


@pytest.mark.parametrize("aggregation, heads, fused", [("mlp", ("pose", "global", "local"), True),
                                                       ("add", ("pose", "global", "local"), False),
                                                       ("local", ("pose", "local"), True),
                                                       ("global", ("pose", "global"), True)])
def test_aggregation_combines_the_named_heads(aggregation, heads, fused):
    """y = MLP(sum of the heads) or, for 'add', their plain sum; 'local' has no global head (source image
    tokens), 'global' no local head (source latent), and the output ignores what no head reads."""
    model = randomised(tiny(aggregation=aggregation))
    x, t, cond = inputs(model)
    with torch.no_grad():
        named = model.condition_heads(cond["pose"], cond["image"], cond["source"])
        assert tuple(named) == heads
        total = sum(named.values())
        expected = model.canet.fuse(total) if fused else total
        assert (model.canet.fuse is not None) == fused
        assert torch.allclose(model.condition(cond["pose"], cond["image"], cond["source"]), expected, atol=1e-6)
        out = model(x, t, **cond)
        other_image = model(x, t, **dict(cond, image=torch.randn_like(cond["image"])))
        other_source = model(x, t, **dict(cond, source=torch.randn_like(cond["source"])))
    assert (rel_err(other_image, out) > 1e-3) == ("global" in heads)
    assert (rel_err(other_source, out) > 1e-3) == ("local" in heads)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_mask_ratio_masks_that_share_of_tokens(ratio):
    """The encoder blocks see the int(L (1 - ratio)) kept tokens, the decoder blocks all L, and only the
    dropped places are predicted: kept places leave MIPNet as they entered it."""
    model = randomised(tiny(mask_ratio=ratio, depth=4, decode_layer=2))
    lengths = [[] for _ in model.tdnet.blocks]
    for i, block in enumerate(model.tdnet.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: lengths[i].append(args[0].shape[1]))
    seen = {}
    model.mipnet.register_forward_hook(lambda module, args, out: seen.update(args=args, out=out))
    x, t, cond = inputs(model)
    noise = torch.rand(2, model.num_patches)
    with torch.no_grad():
        model(x, t, **cond, mask=True, mask_noise=noise)
    kept = int(16 * (1 - ratio))
    assert lengths == [[kept, 16], [kept, 16], [16], [16]]  # encoder: target (kept) and source context
    ids_keep = noise.argsort(dim=1)[:, :kept]
    restored = torch.gather(seen["out"], 1, ids_keep[..., None].expand(-1, -1, 32))
    entering = seen["args"][0] + torch.gather(model.tdnet.decoder_pos_embed.expand(2, -1, -1), 1,
                                              ids_keep[..., None].expand(-1, -1, 32))
    assert torch.equal(restored, entering)


def test_mask_keeps_smallest_noise_and_ratio():
    model = tiny(mask_ratio=0.3)
    tokens = torch.randn(2, 16, 32)
    noise = torch.rand(2, 16)
    kept, ids = model.mipnet.mask(tokens, noise)
    assert kept.shape == (2, int(16 * 0.7), 32)
    assert torch.equal(ids.sort(1).values, noise.argsort(1)[:, :11].sort(1).values)


def test_source_path_gets_no_gradient():
    """MIPNet's context (the source tokens through the encoder blocks) is computed without gradient: the masked
    output depends on the source through it, yet no gradient reaches the source that way."""
    model = randomised(tiny(mipnet="self-cross")).train()
    contexts = []
    model.mipnet.cross_block.attn.register_forward_hook(lambda m, args, out: contexts.append(args[2]))
    x, t, cond = inputs(model)
    source = cond["source"].clone().requires_grad_(True)
    unconditional = torch.ones(2, dtype=torch.bool)  # y = 0: CANet's local head is not a path either
    out = model(x, t, **dict(cond, source=source), drop_cond=unconditional, mask=True)
    with torch.no_grad():
        other = model(x, t, **dict(cond, source=torch.randn_like(source)), drop_cond=unconditional, mask=True)
    assert rel_err(other, out) > 1e-3  # the output does depend on the source ...
    out.square().sum().backward()
    assert source.grad is None or not source.grad.any()  # ... but not through a gradient
    assert not contexts[0].requires_grad and contexts[0].grad_fn is None
    conditional = model(x, t, **dict(cond, source=source), drop_cond=~unconditional, mask=True)
    assert torch.autograd.grad(conditional.square().sum(), source)[0].abs().sum() > 0  # CANet's path trains


def test_condition_drop_rate_in_train_mode_and_never_in_eval_mode():
    """In train mode each sample's y is dropped with probability cond_drop (binomial, 4 standard deviations);
    in eval mode never."""
    model = randomised(tiny(cond_drop=0.3))
    n = 4000
    torch.manual_seed(2)
    x, t, cond = inputs(model, n)
    with torch.no_grad():
        kept = model(x, t, **cond, drop_cond=torch.zeros(n, dtype=torch.bool))
        dropped = model(x, t, **cond, drop_cond=torch.ones(n, dtype=torch.bool))
        trained = model.train()(x, t, **cond)
        evaluated = model.eval()(x, t, **cond)
    is_dropped = (trained - dropped).flatten(1).abs().amax(1) < 1e-6
    is_kept = (trained - kept).flatten(1).abs().amax(1) < 1e-6
    assert (is_dropped ^ is_kept).all()
    assert abs(is_dropped.float().mean().item() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert torch.equal(evaluated, kept)


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


@pytest.mark.parametrize("arg, change, message", [
    ("x", lambda a: a[:, :3], "x must have shape"),
    ("t", lambda a: a[:1], "t must have shape"),
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


def test_checkpoint_of_another_size_fails_listing_keys(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="shape mismatches .*tdnet.pos_embed"):
        load_checkpoint(model.state_dict(), model=tiny(hidden_size=64))
    with pytest.raises(ValueError, match="missing keys .*tdnet.blocks.3"):
        load_checkpoint(model.state_dict(), model=tiny(depth=4))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# For every field of XMDPTConfig, another valid value for the tiny model (a new field must be added here).
OTHER_VALUES = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=64, depth=4, num_heads=4, mlp_ratio=2.0,
                    learn_sigma=False, decode_layer=1, mask_ratio=0.5, mipnet="self", aggregation="add",
                    cond_drop=0.2, pose_dim=32, image_dim=48, dino_tokens=7, prediction="v", consistency=True)


def test_a_checkpoint_that_differs_from_the_config_in_any_field_is_refused_naming_it(tmp_path):
    """Inference checks a checkpoint against its config before building anything: every architecture field
    that differs is named with both values. Only the fields that change training alone (the mask ratio, MIPNet,
    the condition drop) may differ: an inference export carries no MIPNet."""
    assert set(OTHER_VALUES) == {f.name for f in fields(XMDPTConfig)}
    config = tiny().config
    export(tiny(), tmp_path / "tiny", inference_only=False)
    ckpt = read_checkpoint(tmp_path / "tiny")
    assert ckpt.config == config
    for field, value in OTHER_VALUES.items():
        expected = replace(config, **{field: value})
        if field in TRAINING_ONLY:
            check_fits(ckpt.config, expected, "--ckpt tiny")
            continue
        with pytest.raises(InputError, match=rf"^--ckpt tiny does not fit the config:\n  {field}: "
                                             rf"{getattr(config, field)} in the checkpoint, {value} in the config$"):
            check_fits(ckpt.config, expected, "--ckpt tiny")
    two = replace(config, hidden_size=64, prediction="v")
    with pytest.raises(InputError, match="hidden_size: 32 .*\n  prediction: eps"):
        check_fits(ckpt.config, two, "--ckpt tiny")


def test_training_checkpoint_and_exports_roundtrip(tmp_path):
    """One loader for our training checkpoints (EMA or raw weights), the Hugging Face folder that export and
    save_pretrained write, and a .safetensors file with its config beside it; from_pretrained reads the folder."""
    torch.manual_seed(0)
    model, ema = randomised(tiny()), tiny()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "model_config": dict(model.config)},
               tmp_path / "c.pt")
    same = lambda a, b: a.config == b.config and all(torch.equal(x, y) for x, y in
                                                     zip(a.state_dict().values(), b.state_dict().values()))
    assert same(load_checkpoint(tmp_path / "c.pt"), ema)
    assert same(load_checkpoint(tmp_path / "c.pt", use_ema=False), model)
    export(model, tmp_path / "full", inference_only=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert same(load_checkpoint(tmp_path / "full"), model)
    assert same(load_checkpoint(tmp_path / "full" / "model.safetensors"), model)
    assert same(XMDPT.from_pretrained(tmp_path / "full"), model)
    model.save_pretrained(tmp_path / "hub")
    assert same(load_checkpoint(tmp_path / "hub"), model)
    deeper = XMDPT(model.config, depth=4)  # a config with a field replaced: config.json holds the result
    deeper.save_pretrained(tmp_path / "deeper")
    assert json.loads((tmp_path / "deeper" / "config.json").read_text()) == dict(deeper.config)
    assert same(XMDPT.from_pretrained(tmp_path / "deeper"), deeper)
    lean = load_checkpoint(export(model, tmp_path / "lean"))
    assert lean.config == XMDPTConfig(**dict(model.config, mipnet="none")) and lean.mipnet is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in lean.state_dict().items())
    half = load_checkpoint(export(model, tmp_path / "half", dtype=torch.float16))
    assert all(torch.equal(v, model.state_dict()[k].half().float()) for k, v in half.state_dict().items())


def test_export_replaces_a_folder_atomically(tmp_path, monkeypatch):
    """A failed export leaves the previous one as it was, and no partial folder behind."""
    model = randomised(tiny())
    export(model, tmp_path / "w")
    before = (tmp_path / "w" / "model.safetensors").read_bytes()

    def broken(self, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(XMDPT, "_save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        export(randomised(tiny(), std=0.2), tmp_path / "w")
    assert (tmp_path / "w" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


@pytest.mark.parametrize("fields, message", [
    (dict(mipnet="cross-cross"), "mipnet must be one of"),
    (dict(aggregation="concat"), "aggregation must be one of"),
    (dict(mask_ratio=1.5), r"mask_ratio must be in \(0, 1\)"),
    (dict(decode_layer=12), r"decode_layer must be in \[0, depth=12\)"),
    (dict(input_size=9), "input_size .9. must be a multiple of patch_size"),
    (dict(hidden_size=100), "hidden_size .100. must be a multiple of num_heads"),
    (dict(prediction="x0"), "prediction must be one of"),
    (dict(depth=0), "depth must be positive"),
])
def test_config_names_the_bad_field(fields, message):
    """The config, not the model, checks every field, so that a YAML file or a checkpoint is refused before
    anything is built."""
    with pytest.raises(ValueError, match=message):
        XMDPTConfig(**dict(XMDPT_CONFIGS["XMDPT-S/2"], **fields))


def test_config_is_the_model_and_presets_are_configs():
    config = XMDPT_CONFIGS["XMDPT-B/2"]
    assert isinstance(config, XMDPTConfig) and dict(config)["hidden_size"] == 768
    with torch.device("meta"):
        for model in (XMDPT(config), XMDPT(**config), XMDPT(config, input_size=64), XMDPT(**dict(config, input_size=64))):
            assert model.config == XMDPTConfig(**dict(config, input_size=model.config.input_size))
