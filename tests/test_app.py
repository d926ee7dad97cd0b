"""The web app (app.py): the same images as infer_xmdpt.py, and the page itself in a real browser (Debian's
Chromium driven by Playwright), with the bundled demo model."""
import io
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import optional
from PIL import Image

import infer_xmdpt
from data.images import to_uint8
from data.photo import _pose_solution, read_photo
from data.pose import draw_skeleton, load_keypoints, to_image_coords
from inference.pipeline import DEMO_CHECKPOINT, DEMO_CONFIG, Pipeline

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"


@pytest.fixture(scope="module")
def app():
    optional("gradio")
    optional("MediaPipe Pose", _pose_solution)
    import app
    return app


@pytest.fixture(scope="module")
def demo_pipe(app):
    return Pipeline.from_config(DEMO_CONFIG, DEMO_CHECKPOINT)


def cli_image(tmp_path, *argv):
    """The image infer_xmdpt.py writes for own photos with the demo model."""
    infer_xmdpt.main(["--out", str(tmp_path), *argv])
    return np.asarray(Image.open(next((tmp_path / "generated").iterdir())))


def test_gallery_holds_a_dozen_of_our_poses(app):
    assert len(app.GALLERY) == 12 and all(p.suffix == ".json" for p in app.GALLERY)


@pytest.mark.parametrize("mode, framing", [("gallery", "person"), ("keypoint file", "person"), ("photo", "person"),
                                           ("photo", "whole")])
def test_app_gives_the_image_infer_gives(app, demo_pipe, photos, tmp_path, mode, framing):
    """The page's action and infer_xmdpt.py, on the same photo, pose, framing and seed: the same image."""
    astronaut = read_photo(photos / "astronaut.png")
    mirrored = astronaut[:, ::-1].copy()
    Image.fromarray(mirrored).save(tmp_path / "mirrored.png")
    pose = app.GALLERY[4]
    framed, source_view, pose_view, target, image = app.transfer(
        demo_pipe, astronaut, mode, mirrored, str(pose), 4, steps=20, seed=3, framing=framing)
    target_argv = ["--target-pose-from", str(tmp_path / "mirrored.png")] if mode == "photo" else \
        ["--target-pose", str(pose)]
    expected = cli_image(tmp_path / "cli", "--source", str(photos / "astronaut.png"), *target_argv, "--seed", "3",
                         "--steps", "20", "--framing", framing)
    assert image.shape == (32, 32, 3) and np.array_equal(image, expected)
    assert (pose_view is not None) == (mode == "photo")
    assert framed.shape == (32, 32, 3) and source_view.shape == target.shape == (256, 256, 3)


def test_the_fast_model_gives_the_image_infer_fast_gives(app, photos, tmp_path):
    """Served as the demo, the app offers the 4-step student too ("fast (4 steps)"), on its own sampler: the same
    image as infer_xmdpt.py --fast."""
    assert list(app.DEMO_MODELS) == ["demo (50 steps)", "fast (4 steps)"]
    fast = Pipeline.from_config(*app.DEMO_MODELS["fast (4 steps)"])
    assert fast.model.consistency and fast.sampler_for() == "lcm" and fast.sample_defaults["steps"] == 4
    pose = app.GALLERY[4]
    *_, image = app.transfer(fast, read_photo(photos / "astronaut.png"), "gallery", None, None, 4, seed=3)
    expected = cli_image(tmp_path, "--fast", "--source", str(photos / "astronaut.png"), "--target-pose", str(pose),
                         "--seed", "3")
    assert image.shape == (32, 32, 3) and np.array_equal(image, expected)


def test_guidance_for_a_consistency_model_is_refused_alike_by_the_app_and_the_cli(app, photos, tmp_path, capsys):
    """A guidance scale given for the fast model: the app's action and infer_xmdpt.py end with the same one line
    (the Pipeline resolves the settings for both), and the page's guidance controls are disabled for it."""
    from data.errors import InputError, one_line
    fast = Pipeline.from_config(*app.DEMO_MODELS["fast (4 steps)"])
    with pytest.raises(InputError) as refused:
        app.transfer(fast, read_photo(photos / "astronaut.png"), "gallery", None, None, 4, cfg_scale=3.0)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        infer_xmdpt.main(["--fast", "--source", str(photos / "astronaut.png"), "--target-pose", str(app.GALLERY[4]),
                          "--cfg-scale", "3", "--out", str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"infer_xmdpt.py: error: {one_line(refused.value)}\n"
    assert "guidance scale and power do not apply" in one_line(refused.value)
    controls = {c["props"].get("elem_id"): c["props"] for c in app.build({"fast": fast}).config["components"]}
    assert controls["cfg-scale"]["interactive"] is False and controls["scale-pow"]["interactive"] is False


def test_all_poses_encodes_the_photo_once_and_gives_each_poses_image(app, demo_pipe, photos, monkeypatch):
    """All poses: one tile per gallery pose, named after it, holding the image Generate gives for that pose with the
    same photo and seed (upscaled, nearest, to 256 pixels), the pose's skeleton drawn over it; the photo's encoders
    run once, for one image."""
    astronaut = read_photo(photos / "astronaut.png")
    encoded, real = [], Pipeline.encode_sources
    monkeypatch.setattr(Pipeline, "encode_sources", lambda self, images: encoded.append(len(images)) or
                        real(self, images))
    tiles = app.all_poses(demo_pipe, astronaut, steps=5, seed=3)
    assert encoded == [1] and [name for _, name in tiles] == [p.stem for p in app.GALLERY]
    for i in (0, 4, 11):
        *_, image = app.transfer(demo_pipe, astronaut, "gallery", None, None, i, steps=5, seed=3)
        keypoints = load_keypoints(app.GALLERY[i])
        bare = draw_skeleton(to_image_coords(keypoints, (256, 256)), (256, 256)).amax(0).numpy() == 0
        upscaled = image.repeat(8, axis=0).repeat(8, axis=1)
        assert tiles[i][0].shape == (256, 256, 3) and np.array_equal(tiles[i][0][bare], upscaled[bare])


def test_an_example_photo_is_the_demo_sets_picture_with_no_person_to_find(app, demo_pipe):
    """The example photos are test sources of the demo set with their keypoint files: framed as the dataset frames
    them, with nothing detected (MediaPipe misses most of the small synthetic figures), the model sees the
    picture itself, and its skeleton view is drawn from its keypoints."""
    assert len(app.EXAMPLES) >= 4
    png = app.EXAMPLES[0]
    rgb = read_photo(png)
    framed, source_view, _, _, image = app.transfer(demo_pipe, rgb, "gallery", None, None, 2, steps=5,
                                                    example=str(png.with_suffix(".json")))
    assert np.array_equal(framed, rgb) and image.shape == (32, 32, 3)
    skeleton = draw_skeleton(to_image_coords(load_keypoints(png.with_suffix(".json")), (256, 256)), (256, 256))
    drawn = skeleton.amax(0).numpy() > 0
    assert drawn.sum() > 100 and np.array_equal(source_view[drawn], to_uint8(skeleton * 2 - 1)[drawn])


def test_app_names_what_is_wrong(app, demo_pipe, photos):
    coffee, astronaut = read_photo(photos / "coffee.png"), read_photo(photos / "astronaut.png")
    with pytest.raises(ValueError, match="your photo: no person found"):
        app.transfer(demo_pipe, coffee, "gallery", None, None, 0)
    with pytest.raises(ValueError, match="the pose photo: no person found"):
        app.transfer(demo_pipe, astronaut, "photo", coffee, None, 0)
    with pytest.raises(ValueError, match="upload the photo whose pose"):
        app.transfer(demo_pipe, astronaut, "photo", None, None, 0)
    with pytest.raises(ValueError, match="upload a photo of a person as the source, or pick an example"):
        app.transfer(demo_pipe, None, "gallery", None, None, 0)


# ---- in a real browser ------------------------------------------------------------------------------------

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def system_chromium():
    """The path of Debian's chromium, which Playwright drives (its own browser download cannot work here)."""
    path = shutil.which("chromium")
    if path is None:
        raise ImportError("Debian's chromium is not installed (apt-get install chromium; .ci/run does)")
    return path


@pytest.fixture(scope="module")
def browser():
    chromium = optional("chromium", system_chromium)
    playwright = optional("playwright.sync_api").sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=chromium, args=BROWSER_ARGS)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def served(app):
    """python app.py on a free localhost port, as a user starts it; its URL once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if server.poll() is not None:
                pytest.fail(f"app.py exited: {server.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url, wait_until="load", timeout=60000)
    page.locator("#generate").wait_for(timeout=60000)
    return page


def shown_image(page, element):
    """The image an output element shows, as the browser received it: a uint8 array."""
    image = page.locator(f"#{element} img")
    image.wait_for(timeout=180000)
    return np.asarray(Image.open(io.BytesIO(page.request.get(image.get_attribute("src")).body())).convert("RGB"))


@pytest.mark.slow
def test_the_page_turns_a_photo_into_a_person_in_a_pose(browser, served, photos, tmp_path):
    """Upload scikit-image's astronaut, pick a gallery pose, generate: an image of the model's size that is not
    blank, the one infer_xmdpt.py makes of the same photo and pose, appears; a screenshot is kept in outputs/."""
    page = open_page(browser, served)
    assert "bundled demo model" in page.locator("#model").inner_text()
    page.locator("#source input[type=file]").set_input_files(str(photos / "astronaut.png"))
    page.locator("#gallery button:has-text('05_full')").click()
    page.locator("#target img").wait_for(timeout=60000)  # the choice has reached the server
    page.click("#generate")
    generated = shown_image(page, "generated")
    assert generated.shape == (32, 32, 3) and generated.std() > 10
    expected = cli_image(tmp_path, "--source", str(photos / "astronaut.png"), "--target-pose",
                         str(ROOT / "assets" / "poses" / "05_full.json"))
    assert np.array_equal(generated, expected)
    OUTPUTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)
    page.screenshot(path=OUTPUTS / "app_screenshot.png", full_page=True)
    page.close()


@pytest.mark.slow
def test_an_example_clicked_on_the_page_is_generated_with_its_keypoints(app, demo_pipe, browser, served):
    """Click an example photo (the page shows the picture, not its keypoint file's path), a gallery pose, Generate:
    the image transfer() gives for that picture with its keypoint file; then All poses fills the gallery with one
    tile per pose."""
    page = open_page(browser, served)
    assert ".json" not in page.locator("#examples").inner_text()
    page.locator("#examples button").nth(1).click()
    page.locator("#gallery button:has-text('03_front')").click()
    page.locator("#target img").wait_for(timeout=60000)  # the choice has reached the server
    page.click("#generate")
    png = app.EXAMPLES[1]
    *_, expected = app.transfer(demo_pipe, read_photo(png), "gallery", None, None, 2,
                                example=str(png.with_suffix(".json")))
    assert np.array_equal(shown_image(page, "generated"), expected)
    page.click("#all-poses")
    tiles = page.locator("#all-poses-gallery img")
    tiles.nth(len(app.GALLERY) - 1).wait_for(timeout=180000)
    assert tiles.count() == len(app.GALLERY)
    page.close()


@pytest.mark.slow
def test_the_page_says_a_photo_shows_no_person(browser, served, photos):
    """A photo of a cup of coffee: the error appears on the page; the server keeps serving."""
    page = open_page(browser, served)
    page.locator("#source input[type=file]").set_input_files(str(photos / "coffee.png"))
    page.click("#generate")
    page.get_by_text("your photo: no person found").first.wait_for(timeout=60000)
    page.locator("#source button[aria-label='Remove Image']").click()
    page.locator("#source input[type=file]").set_input_files(str(photos / "astronaut.png"))
    page.click("#generate")
    assert shown_image(page, "generated").shape == (32, 32, 3)
    page.close()
