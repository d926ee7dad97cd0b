import io

import lmdb
import numpy as np
import pytest
import timm
import torch
from conftest import load_fixture
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from data.errors import InputError
from eval.images import flat_name
from models.encoders import (
    LATENT_SCALE,
    DINOv2,
    IdentityFirstStage,
    VAEFirstStage,
    build_encoders,
    dino_input,
    dinov2_width,
    resample_pos_embed,
)
from scripts.finetune_vae_decoder import build_parser, finetune_decoder

WIDTHS = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}  # DINOv2 (Oquab et al., 2023), table 1

SMALL_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and far faster than two on shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dino_fixture():
    return load_fixture("dinov2_vits14_depth1.pt")


@pytest.fixture(scope="module")
def small_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "small-vae"
    VAEFirstStage.from_config(SMALL_VAE).vae.save_pretrained(path)
    return path


# ---- DINOv2 ----------------------------------------------------------------------------------------------

def test_dinov2_reproduces_hub_features(dino_fixture, tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dino_fixture["state_dict"], path)
    dino = DINOv2("vits14", path, depth=1)
    out = dino(dino_fixture["input"].float())
    assert out.shape == (2, 257, 384) and dino.dim == 384
    assert rel_err(out, dino_fixture["features"]) < 1e-5


def test_dinov2_timm_safetensors_file(dino_fixture, tmp_path):
    # timm's key layout (no mask_token), still with the 37x37 grid of the released weights
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in dino_fixture["state_dict"].items() if k != "mask_token"}, path)
    out = DINOv2("vits14", path, depth=1)(dino_fixture["input"].float())
    assert rel_err(out, dino_fixture["features"]) < 1e-5


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fixture_dino_inputs(parity):
    """The released pipeline's DINOv2 inputs: the [-1, 1] image and the [0, 1] skeleton, resized bicubic
    without antialias, not rescaled."""
    pose = parity["pose"]
    assert rel_error(dino_input(pose["image"]), pose["dino_image"]) < 1e-4
    assert rel_error(dino_input(pose["rendered"]), pose["dino_pose"]) < 1e-4
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        dino_input(pose["rendered"][0])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        dino_input(torch.zeros(1, 4, 64, 64))


def test_dinov2_resizes_its_own_input(parity):
    """DINOv2 takes images of any size and resizes them as the released pipeline did: on the fixture's
    256x256 images it gives the tokens of the fixture's 224x224 inputs."""
    torch.manual_seed(0)
    dino = DINOv2("vits14", "random", depth=1)
    pose = parity["pose"]
    torch.testing.assert_close(dino(pose["image"].float()), dino(pose["dino_image"].float()), rtol=1e-4, atol=1e-4)
    assert dino(torch.rand(1, 3, 64, 48)).shape == (1, 257, 384)


def test_dinov2_width_table():
    assert {variant: dinov2_width(variant) for variant in WIDTHS} == WIDTHS
    for variant, width in WIDTHS.items():
        with torch.device("meta"):
            assert DINOv2(variant, "random", depth=1).dim == width
    with pytest.raises(ValueError, match="vitx14"):
        dinov2_width("vitx14")


def test_naive_timm_loading_misses(dino_fixture):
    """Why we resample ourselves: timm's filter resizes the grid to 16x16 with antialiasing."""
    net = timm.create_model("vit_small_patch14_dinov2", img_size=224, depth=1, num_classes=0).eval()
    state = {k: v.float() for k, v in dino_fixture["state_dict"].items()}
    net.load_state_dict(checkpoint_filter_fn(state, net))
    with torch.no_grad():
        err = rel_err(net.forward_features(dino_fixture["input"].float()), dino_fixture["features"])
    assert err > 1e-2


def test_grid_that_fits_is_not_resampled(tmp_path):
    torch.manual_seed(0)
    dino = DINOv2("vits14", "random", depth=1)
    pos = dino.net.pos_embed.detach()
    assert resample_pos_embed(pos, 16) is pos
    path = tmp_path / "vits14_224.safetensors"
    save_file(dino.net.state_dict(), path)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(DINOv2("vits14", path, depth=1)(x), dino(x))


def test_dinov2_giant_original_keys(tmp_path):
    """vitg14's original checkpoint names its SwiGLU layers mlp.w12 / mlp.w3 and has a mask token."""
    torch.manual_seed(0)
    timm_state = DINOv2("vitg14", "random", depth=1).net.state_dict()
    original = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
                for k, v in timm_state.items()}
    original["mask_token"] = torch.zeros(1, 1536)
    original["pos_embed"] = torch.randn(1, 1 + 37 * 37, 1536)
    path = tmp_path / "dinov2_vitg14_pretrain.pth"
    torch.save(original, path)
    dino = DINOv2("vitg14", path, depth=1)
    assert dino.dim == 1536
    assert torch.equal(dino.net.blocks[0].mlp.fc1.weight, original["blocks.0.mlp.w12.weight"])


def test_dinov2_errors(tmp_path):
    missing = tmp_path / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth") as e:
        DINOv2("vitb14", missing)
    assert str(missing) in str(e.value)
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth" in str(e.value)
    with pytest.raises(ValueError, match="random"):
        DINOv2("vitb14", None)
    with pytest.raises(ValueError, match="vitx14"):
        DINOv2("vitx14", "random")
    dino = DINOv2("vits14", "random", depth=1)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(3, 256, 256\)"):
        dino(torch.zeros(3, 256, 256))


def test_dinov2_is_frozen():
    dino = DINOv2("vits14", "random", depth=1)
    dino.train()
    assert not dino.training and not dino.net.training
    assert not any(p.requires_grad for p in dino.parameters())
    assert not dino(torch.randn(1, 3, 224, 224, requires_grad=True)).requires_grad


# ---- first stages ----------------------------------------------------------------------------------------

def test_vae_first_stage(small_vae_dir):
    fs = VAEFirstStage.from_pretrained(small_vae_dir)
    assert fs.latent_channels == 4 and fs.downsample == 2 and fs.scale == LATENT_SCALE
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = fs.encode(x, generator=torch.Generator().manual_seed(1))
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    posterior = fs.vae.encode(x).latent_dist
    assert torch.allclose(z, posterior.sample(torch.Generator().manual_seed(1)) * LATENT_SCALE)

    mean, logvar = fs.moments(x)
    assert torch.allclose(mean, posterior.mean) and torch.allclose(logvar, posterior.logvar)
    again = fs.sample_from_moments(mean, logvar, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, z)

    image = fs.decode(z)
    assert image.shape == x.shape
    assert torch.allclose(image, fs.vae.decode(z / LATENT_SCALE).sample)


def test_vae_is_frozen_and_reloads(small_vae_dir):
    torch.manual_seed(0)
    built = VAEFirstStage.from_config(SMALL_VAE)
    loaded = VAEFirstStage.from_pretrained(small_vae_dir)
    loaded.train()
    assert not loaded.training and not loaded.vae.training
    assert not any(p.requires_grad for p in loaded.parameters())
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(built.decode(z), loaded.decode(z))
    assert not loaded.decode(z.requires_grad_()).requires_grad


def test_vae_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="sd-vae-ft-mse") as e:
        VAEFirstStage.from_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_identity_first_stage():
    fs = IdentityFirstStage()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert fs.latent_channels == 3 and fs.downsample == 1
    assert torch.equal(fs.encode(x), x) and torch.equal(fs.decode(x), x)
    mean, logvar = fs.moments(x)
    assert torch.equal(fs.sample_from_moments(mean, logvar), x)


# ---- build_encoders --------------------------------------------------------------------------------------

def test_build_encoders(small_vae_dir):
    torch.manual_seed(0)
    cfg = {"pose": {"dinov2": "vitb14", "weights": "random", "depth": 1},
           "image": {"dinov2": "vits14", "weights": "random", "depth": 1},
           "first_stage": {"type": "vae", "path": str(small_vae_dir), "downsample": 2}}
    enc = build_encoders(cfg, "cpu")
    assert (enc.pose.dim, enc.image.dim) == (768, 384)
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    assert enc.pose(x).shape == (2, 257, 768) and enc.image(x).shape == (2, 257, 384)
    assert enc.first_stage.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 16, 16)
    enc.train()
    assert not any(m.training for m in enc.modules() if m is not enc)
    assert not any(p.requires_grad for p in enc.parameters())

    random_vae = build_encoders({**cfg, "first_stage": {"type": "vae", "path": None, "random": SMALL_VAE}})
    assert random_vae.first_stage.downsample == 2
    identity = build_encoders({**cfg, "first_stage": {"type": "identity"}})
    assert isinstance(identity.first_stage, IdentityFirstStage)
    # A VAE whose grid is not the one the config derives the model's latent size from is refused, naming it.
    with pytest.raises(InputError, match=rf"the VAE in {small_vae_dir} downsamples 2x into 4 channels, but "
                                         r"encoders.first_stage says 8x and 4"):
        build_encoders({**cfg, "first_stage": {"type": "vae", "path": str(small_vae_dir)}})


def test_build_encoders_checks_files_first(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("built an encoder before checking the files")

    monkeypatch.setattr(timm, "create_model", no_build)
    random_dino = {"dinov2": "vits14", "weights": "random"}
    with pytest.raises(FileNotFoundError, match="vae-missing"):
        build_encoders({"pose": random_dino, "image": random_dino,
                        "first_stage": {"type": "vae", "path": str(tmp_path / "vae-missing")}})
    with pytest.raises(FileNotFoundError, match="dinov2_vitg14_pretrain.pth"):
        giant = {"dinov2": "vitg14", "weights": str(tmp_path / "dinov2_vitg14_pretrain.pth")}
        build_encoders({"pose": random_dino, "image": giant, "first_stage": {"type": "identity"}})


# ---- VAE decoder fine-tuning -----------------------------------------------------------------------------

def write_tiny_lmdb(root, n=4, size=32):
    names = [f"img/MEN/Tees/id_0000000{i}/01_1_front.jpg" for i in range(n)]
    (root / "train.lst").write_text("".join(flat_name(name) + ".jpg\n" for name in names))  # as PIDM's list
    yy, xx = np.mgrid[0:size, 0:size] / size
    with lmdb.open(str(root / f"{size}-{size}"), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, name in enumerate(names):
            rgb = np.stack([xx, yy, np.full_like(xx, i / n)], axis=-1)
            buf = io.BytesIO()
            Image.fromarray((rgb * 255).astype(np.uint8)).save(buf, format="PNG")
            txn.put(name.replace(".jpg", ".png").encode(), buf.getvalue())


def test_finetune_decoder(small_vae_dir, tmp_path):
    write_tiny_lmdb(tmp_path)
    out = tmp_path / "vae-ft"
    losses = finetune_decoder(small_vae_dir, tmp_path, out, size=32, steps=20, batch_size=2, lr=1e-3,
                              num_workers=0, progress=False)
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])

    before = VAEFirstStage.from_pretrained(small_vae_dir).vae
    after = VAEFirstStage.from_pretrained(out).vae
    assert all(torch.equal(p, after.state_dict()[k]) for k, p in before.state_dict().items()
               if k.startswith(("encoder.", "quant_conv.")))
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left over


def test_finetune_cli_documents_every_flag():
    assert all(action.help for action in build_parser()._actions)


@pytest.mark.cuda
def test_encoders_on_cuda_in_bf16(dino_fixture, small_vae_dir, tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dino_fixture["state_dict"], path)
    out = DINOv2("vits14", path, depth=1).cuda()(dino_fixture["input"].float().cuda())
    assert out.dtype == torch.float32
    ref = dino_fixture["features"].cuda()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    fs = VAEFirstStage.from_pretrained(small_vae_dir).cuda()
    z = fs.encode(torch.zeros(1, 3, 32, 32, device="cuda"))
    assert z.dtype == torch.float32 and fs.decode(z).dtype == torch.float32
