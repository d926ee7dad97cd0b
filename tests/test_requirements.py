"""What is installed: the OpenCV that requirements.txt pins, and optional dependencies that CI must have."""

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import optional

REQUIREMENTS = Path(__file__).parents[1] / "requirements.txt"
# Each of these installs the same cv2 package, over any other's.
OPENCV_DISTRIBUTIONS = ["opencv-python", "opencv-python-headless", "opencv-contrib-python",
                        "opencv-contrib-python-headless"]


def test_one_opencv_the_pinned_one():
    """Exactly one OpenCV distribution is installed, the one requirements.txt pins, and cv2 is its version."""
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)", REQUIREMENTS.read_text(), flags=re.MULTILINE))
    (opencv,) = [name for name in OPENCV_DISTRIBUTIONS if name in pins]
    installed = {dist.metadata["Name"].lower(): dist.version for dist in metadata.distributions()
                 if dist.metadata["Name"].lower() in OPENCV_DISTRIBUTIONS}
    assert installed == {opencv: pins[opencv]}
    import cv2
    assert cv2.__version__ == pins[opencv].rsplit(".", 1)[0]  # 5.0.0.93 is OpenCV 5.0.0, wheel build 93


@pytest.mark.parametrize("ci, expected", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_optional_dependency_skips_but_fails_under_ci(monkeypatch, ci, expected):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match="not usable") as outcome:
        optional("mediapipe")
    assert outcome.type is expected
    assert optional("json").dumps(1) == "1"
