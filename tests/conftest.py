import importlib
import os
from pathlib import Path

import pytest
import torch

# The reference outputs of the released X-MDPT code and of DINOv2 (tests/fixtures/README.md says what each file
# holds and how it was made).
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# OpenPose's COCO-18 joints in order, by name: the tests check the index tables of data/ against these.
COCO18_NAMES = ["nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
                "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
                "right_eye", "left_eye", "right_ear", "left_ear"]


def optional(name, importer=None):
    """`importer()` (by default: import the module `name`) for a test that needs an optional dependency.

    When it raises ImportError the test is skipped, except under CI=true: CI installs every optional
    dependency (.ci/run), so there the test fails rather than pass silently as a skip.
    """
    try:
        return importer() if importer else importlib.import_module(name)
    except ImportError as e:
        message = f"{name} not usable here: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: CI installs it, so it must work)", pytrace=False)
        pytest.skip(message)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def load_fixture(name):
    """A file of tests/fixtures, loaded with torch.load."""
    return torch.load(FIXTURES / name, weights_only=True)


def as_float(tensors):
    """Half-precision fixture tensors upcast to float32 (the references were computed on the rounded values)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


@pytest.fixture(scope="session")
def lowt():
    """(model, inputs, condition, outputs) of official_lowt_init.pt: the released code's losses at
    t = 0, 0, 1, 3, 20, 150, 600, 999 (tests/fixtures/README.md)."""
    from models import load_checkpoint
    data = load_fixture("official_lowt_init.pt")
    inputs = as_float(data["inputs"])
    cond = dict(pose=inputs["dino_tgt_pose"], image=inputs["dino_src_img"], source=inputs["src_img"])
    return load_checkpoint(as_float(data["state_dict"])), inputs, cond, data["outputs"]


@pytest.fixture(scope="session")
def released_init():
    """The released initialisation's deterministic entries (official_lowt_init.pt["init"])."""
    return load_fixture("official_lowt_init.pt")["init"]


@pytest.fixture(scope="session")
def parity():
    """The released X-MDPT code's reference outputs (tests/fixtures/README.md)."""
    return load_fixture("official_parity_small.pt")


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """Real photographs (scikit-image's) as PNG files: a person (astronaut.png) and a thing (coffee.png)."""
    from PIL import Image
    data = optional("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder
