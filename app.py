"""A web app: your photo in, the person in a new pose out (Gradio; pip install -r requirements-app.txt).

  python app.py                          # the bundled demo model, at http://127.0.0.1:7860
  python app.py --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s_ema_0.9999_300000.pt --device cuda

The page takes a photo of a person (or one of the example photos, the demo set's test sources) and a target pose
from another photo, from a keypoint file (DeepFashion .txt or OpenPose .json) or from the gallery (assets/poses).
It shows the photo framed as the model sees it, the skeletons found on the photos, the target skeleton and the
generated image; "All poses" draws the photo in every pose of the gallery, the photo encoded once. It runs the
same Pipeline and the same framing of photos and poses as infer_xmdpt.py (data/photo.py, inference/poses.py), so
the same inputs and seed give the same image. Errors (no person, too few joints, an unreadable file) appear on
the page.
"""
import argparse
from pathlib import Path

import gradio as gr

from data.errors import InputError, UserError, one_line, reported
from data.images import to_uint8
from data.photo import FRAMINGS, dataset_photo, frame_photo
from data.pose import draw_skeleton, load_keypoints, to_image_coords
from devices import default_device
from inference.pipeline import (DEMO_CHECKPOINT, DEMO_CONFIG, FAST_DEMO_CHECKPOINT, FAST_DEMO_CONFIG, SAMPLERS,
                                Pipeline, add_model_arguments, model_files)
from inference.poses import VIEW_SIZE, contact_sheet, pose_from_file, pose_from_photo, pose_overlay

ROOT = Path(__file__).resolve().parent
GALLERY = sorted((ROOT / "assets" / "poses").glob("*.json"))
# Example photos: test sources of the demo set, each with its keypoint file (a dataset picture is framed already).
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.png"))
MODES = ("gallery", "photo", "keypoint file")
# Images at the model's size (32x32 for the demo) are shown as large as the others, pixel for pixel.
CSS = "#framed img, #generated img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}"
DEMO_NOTE = ("This is the bundled demo model. It has only ever seen the small synthetic figures of the demo "
             "set, at 32x32 pixels, so real photos give rough results. Start the app with `--config` and "
             "`--ckpt` to use a released X-MDPT model.")
# The bundled models, when the app serves the demo: the demo model and its distilled student.
DEMO_MODELS = {"demo (50 steps)": (DEMO_CONFIG, DEMO_CHECKPOINT), "fast (4 steps)": (FAST_DEMO_CONFIG,
                                                                                      FAST_DEMO_CHECKPOINT)}
FAST_NOTE = ("**fast (4 steps)** is the demo model distilled into a 4-step student (consistency distillation, then "
             "distribution matching): 4 network evaluations per image instead of 100, as sharp as the demo model "
             "(docs/demo.md gives the measurements).")
OWN = "its own"  # the sampler and steps of the chosen model: ddim and 50, or lcm and 4 for a consistency model


def skeleton_view(keypoints):
    """The skeleton of keypoints (DeepFashion convention) drawn at VIEW_SIZE, as uint8 (V, V, 3)."""
    size = (VIEW_SIZE, VIEW_SIZE)
    return to_uint8(draw_skeleton(to_image_coords(keypoints, size), size) * 2 - 1)


def framed_source(pipe, source_rgb, framing, example=None):
    """The source photo as the model sees it: an example photo (`example`: its keypoint file) framed as the dataset
    frames it, or a photo of one's own framed around the person found on it."""
    if source_rgb is None:
        raise InputError("upload a photo of a person as the source, or pick an example")
    if example:
        return dataset_photo(source_rgb, load_keypoints(example), pipe.size)
    return frame_photo(source_rgb, pipe.size, "your photo", framing)


def sampling(pipe, sampler, steps, cfg_scale, scale_pow):
    """The page's sampling settings, resolved by the pipeline (0 steps: the model's own)."""
    return pipe.settings(sampler=sampler, steps=int(steps) if steps else None, cfg_scale=cfg_scale,
                         scale_pow=scale_pow)


def transfer(pipe, source_rgb, mode, pose_rgb, pose_path, gallery_index, sampler=None, steps=None,
             cfg_scale=None, scale_pow=None, seed=0, framing="person", example=None, progress=False):
    """The page's Generate. -> uint8 images: the source framed as the model sees it, the source photo with its
    skeleton, the pose photo with its skeleton (None unless the pose came from a photo), the target skeleton, and
    the generated image (at the model's size)."""
    source = framed_source(pipe, source_rgb, framing, example)
    pose_view = None
    if mode == "photo":
        if pose_rgb is None:
            raise InputError("upload the photo whose pose is the target, or pick another source of poses")
        target = pose_from_photo(pose_rgb, pipe.size, "the pose photo", framing)
        keypoints, pose_view = target.keypoints, to_uint8(pose_overlay(pose_rgb, target))
    elif mode == "keypoint file":
        if pose_path is None:
            raise InputError("upload a keypoint file (.txt or .json), or pick another source of poses")
        keypoints = pose_from_file(pose_path)
    else:
        keypoints = pose_from_file(GALLERY[gallery_index])
    settings = sampling(pipe, sampler, steps, cfg_scale, scale_pow)
    image = pipe.in_poses(pipe.encode_sources(source.image[None]), pipe.skeletons([keypoints]), seed=int(seed),
                          settings=settings, progress=progress)[0]
    return (to_uint8(source.image), to_uint8(pose_overlay(source_rgb, source)), pose_view,
            skeleton_view(keypoints), to_uint8(image))


def all_poses(pipe, source_rgb, sampler=None, steps=None, cfg_scale=None, scale_pow=None, seed=0, framing="person",
              example=None, progress=False):
    """The page's All poses: the photo in every pose of the gallery, encoded once, each image as Generate gives it
    for that pose. -> [(uint8 image with the pose's skeleton drawn over it, the pose's name)]."""
    source = framed_source(pipe, source_rgb, framing, example)
    keypoints = [pose_from_file(path) for path in GALLERY]
    images = pipe.in_poses(pipe.encode_sources(source.image[None]), pipe.skeletons(keypoints), seed=int(seed),
                           settings=sampling(pipe, sampler, steps, cfg_scale, scale_pow), progress=progress)
    sheet = contact_sheet(source.image, list(zip(keypoints, images)))  # source, then each pose, side by side
    view = sheet.shape[-2]
    return [(to_uint8(sheet[:, :, view * (i + 1):view * (i + 2)]), path.stem) for i, path in enumerate(GALLERY)]


def build(pipes, demo=False):
    """The page (a gr.Blocks) around loaded pipelines, by name: the first is the default, and with several the
    page offers the choice."""
    first = next(iter(pipes.values()))

    def settings_of(name, sampler, steps, cfg_scale, scale_pow):
        """The pipeline and the Advanced settings for it: no guidance for a consistency model (its controls are
        disabled), the model's own sampler for OWN."""
        pipe = pipes[name]
        guidance = (None, None) if pipe.model.consistency else (cfg_scale, scale_pow)
        return pipe, dict(sampler=None if sampler == OWN else sampler, steps=steps, cfg_scale=guidance[0],
                          scale_pow=guidance[1])

    def run(name, source, mode, pose_rgb, pose_path, index, sampler, steps, cfg_scale, scale_pow, seed, framing,
            example, progress=gr.Progress(track_tqdm=True)):
        pipe, settings = settings_of(name, sampler, steps, cfg_scale, scale_pow)
        try:
            return transfer(pipe, source, mode, pose_rgb, pose_path, index, **settings, seed=seed, framing=framing,
                            example=example, progress=True)
        except UserError as e:
            raise gr.Error(one_line(e)) from None

    def run_all(name, source, sampler, steps, cfg_scale, scale_pow, seed, framing, example,
                progress=gr.Progress(track_tqdm=True)):
        pipe, settings = settings_of(name, sampler, steps, cfg_scale, scale_pow)
        try:
            return all_poses(pipe, source, **settings, seed=seed, framing=framing, example=example, progress=True)
        except UserError as e:
            raise gr.Error(one_line(e)) from None

    def guidance_controls(name):
        """The guidance controls apply to diffusion models only: disabled for a consistency model."""
        return [gr.update(interactive=not pipes[name].model.consistency)] * 2

    def show(mode):
        return [gr.update(visible=mode == m) for m in MODES]

    def selected(event: gr.SelectData):
        """A gallery pose chosen: its index, and its skeleton shown as the target pose at once."""
        return event.index, skeleton_view(pose_from_file(GALLERY[event.index]))

    def picked_example(event: gr.SelectData):
        return str(EXAMPLES[event.index].with_suffix(".json"))

    with gr.Blocks(title="X-MDPT", analytics_enabled=False) as page:
        gr.Markdown(f"# X-MDPT: your photo, in a new pose\nModel: **{first.description}**." +
                    (f"\n\n{DEMO_NOTE}" if demo else "") + (f" {FAST_NOTE}" if len(pipes) > 1 else ""),
                    elem_id="model")
        model = gr.Radio(list(pipes), value=next(iter(pipes)), label="Model", visible=len(pipes) > 1,
                         elem_id="model-choice")
        example = gr.Textbox(visible=False, elem_id="example")  # the keypoint file of an example photo, if one
        with gr.Row():
            with gr.Column():
                source = gr.Image(type="numpy", sources=["upload"], format="png", label="Your photo (one person)",
                                  elem_id="source")
                if demo and EXAMPLES:
                    shown = gr.Examples([[str(png)] for png in EXAMPLES], [source], elem_id="examples",
                                        label="Or an example: test sources of the demo set")
                    shown.dataset.select(picked_example, None, example)  # its keypoint file, not shown
            with gr.Column():
                mode = gr.Radio(MODES, value="gallery", label="Target pose from", elem_id="mode")
                gallery = gr.Gallery([(skeleton_view(pose_from_file(p)), p.stem) for p in GALLERY], label="Poses",
                                     columns=6, allow_preview=False, selected_index=0, format="png",
                                     elem_id="gallery")
                pose_rgb = gr.Image(type="numpy", sources=["upload"], format="png", visible=False,
                                    label="A photo in the target pose", elem_id="pose-photo")
                pose_path = gr.File(file_types=[".txt", ".json"], type="filepath", visible=False,
                                    label="Keypoint file (DeepFashion .txt or OpenPose .json)", elem_id="pose-file")
        with gr.Accordion("Advanced", open=False):
            sampler = gr.Radio([OWN, *SAMPLERS], value=OWN, label="Sampler (its own: ddim, the released one, or lcm "
                               "for a consistency model)")
            steps = gr.Slider(0, 200, value=0, step=1, label=f"Sampling steps (0: the model's own, "
                              f"{' or '.join(str(p.sample_defaults['steps']) for p in pipes.values())})")
            diffusion = not first.model.consistency
            cfg_scale = gr.Slider(1.0, 10.0, value=first.sample_defaults["cfg_scale"], step=0.1, interactive=diffusion,
                                  label="Guidance scale (diffusion models; the fast model has its guidance folded in)",
                                  elem_id="cfg-scale")
            scale_pow = gr.Number(value=first.sample_defaults["scale_pow"], interactive=diffusion, elem_id="scale-pow",
                                  label="Guidance power (power-cosine schedule; diffusion models)")
            seed = gr.Number(value=0, precision=0, label="Seed")
            framing = gr.Radio(list(FRAMINGS), value="person", label="Framing of the photos (person: cropped around "
                               "the person, then padded to DeepFashion's 176:256; whole: the whole photo padded)")
        with gr.Row():
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            every = gr.Button("All poses (the gallery's, the photo encoded once)", elem_id="all-poses")
        with gr.Row():
            outputs = [gr.Image(label=label, elem_id=name, height=VIEW_SIZE, format="png", interactive=False)
                       for name, label in (("framed", "Your photo, framed"), ("source-skeleton", "Its skeleton"),
                                           ("pose-skeleton", "The pose photo's skeleton"), ("target", "Target pose"),
                                           ("generated", "Generated"))]
        poses = gr.Gallery(label="In every pose of the gallery", columns=6, format="png", elem_id="all-poses-gallery")
        chosen = gr.State(0)
        gallery.select(selected, None, [chosen, outputs[3]])
        mode.change(show, mode, [gallery, pose_rgb, pose_path])
        model.change(guidance_controls, model, [cfg_scale, scale_pow])
        for event in (source.upload, source.clear):  # a photo of one's own is no example
            event(lambda: "", None, example)
        button.click(run, [model, source, mode, pose_rgb, pose_path, chosen, sampler, steps, cfg_scale, scale_pow,
                           seed, framing, example], outputs)
        every.click(run_all, [model, source, sampler, steps, cfg_scale, scale_pow, seed, framing, example], poses)
    return page


def main(argv=None):
    """Load the pipeline and serve the page."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    args = p.parse_args(argv)
    config, checkpoint = model_files(p, args)
    files = DEMO_MODELS if config == DEMO_CONFIG else {Path(str(checkpoint)).name: (config, checkpoint)}
    with reported("app.py"):
        pipes, encoders = {}, None
        for name, (c, k) in files.items():
            pipes[name] = Pipeline.from_config(c, k, args.device or default_device(), args.compile, encoders)
            encoders = pipes[name].encoders  # the demo model and its student share their encoders
    fonts = ["ui-sans-serif", "system-ui", "sans-serif"]  # the system's: no font is fetched from the web
    build(pipes, demo=config in (DEMO_CONFIG, FAST_DEMO_CONFIG)).launch(
        server_name=args.host, server_port=args.port, ssr_mode=False, css=CSS,
        theme=gr.themes.Default(font=fonts, font_mono=["ui-monospace", "monospace"]))


if __name__ == "__main__":
    main()
