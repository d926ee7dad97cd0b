from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def parity():
    """The released X-MDPT code's reference outputs (tests/fixtures/README.md)."""
    return torch.load(FIXTURES / "official_parity_small.pt", weights_only=True)
