"""The inference pipeline: X-MDPT and its frozen encoders, loaded once; source images and target poses in,
images of the sources' people in the target poses out. infer_xmdpt.py, the web app, training's sample grids
and the analysis scripts all generate through it.
"""
from pathlib import Path

import torch

from configs import load_config, model_config
from data.errors import InputError
from data.pose import draw_skeleton, to_image_coords
from models import XMDPT, Diffusion
from models.checkpoint import check_fits, read_checkpoint, strict_load
from models.consistency import consistency_sample
from models.encoders import build_encoders

# The samplers of diffusion models, and that of consistency models (models/consistency.py).
DIFFUSION_SAMPLERS, CONSISTENCY_SAMPLER = ("ddim", "dpm++"), "lcm"
SAMPLERS = (*DIFFUSION_SAMPLERS, CONSISTENCY_SAMPLER)
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG, DEMO_CHECKPOINT = ROOT / "configs" / "demo.yaml", ROOT / "assets" / "xmdpt_demo"
FAST_DEMO_CONFIG, FAST_DEMO_CHECKPOINT = ROOT / "configs" / "distill_demo.yaml", ROOT / "assets" / "xmdpt_demo_fast"


def add_model_arguments(parser):
    """--config, --ckpt (both, or neither for the bundled demo model; see `model_files`), --fast and --device."""
    parser.add_argument("--config", help="YAML config of the model and encoders (default: the demo's)")
    parser.add_argument("--ckpt", help="a released state dict (.pt), our training checkpoint (EMA weights are used) "
                                       "or an export folder (default: the bundled demo model, assets/xmdpt_demo)")
    parser.add_argument("--fast", action="store_true",
                        help="the bundled fast demo model instead (assets/xmdpt_demo_fast, configs/distill_demo.yaml): "
                             "the demo model distilled into a consistency model that samples in 4 steps")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu; under torchrun each "
                                         "process takes the GPU of its local rank)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the denoiser with torch.compile: faster sampling, after a compile that takes "
                             "seconds to minutes on the first batch (and again if the batch size changes)")


def model_files(parser, args):
    """(config, checkpoint) of the parsed `add_model_arguments`: the demo model's when both are left out."""
    if bool(args.config) != bool(args.ckpt):
        parser.error("give --config and --ckpt together (or neither, for the demo)")
    fast = getattr(args, "fast", False)
    if fast and args.config:
        parser.error("--fast is the bundled fast demo model: give it without --config and --ckpt")
    if fast:
        return FAST_DEMO_CONFIG, FAST_DEMO_CHECKPOINT
    return (args.config, args.ckpt) if args.config else (DEMO_CONFIG, DEMO_CHECKPOINT)


@torch.no_grad()
def encode_pairs(encoders, sources, skeletons, seeds=None, device="cpu"):
    """What the model is conditioned on, for pairs of sources (N, 3, S, S) in [-1, 1] and target skeletons
    (N, 3, S, S) in [0, 1]: DINOv2 tokens of the skeletons (`pose`) and of the sources (`image`), and the
    sources' latents (`source`). With `seeds` (one int per pair), each pair's generator draws its source's
    posterior sample, then its starting noise (`noise`), and its state is kept (`generator_states`) for the
    noise a consistency sampler adds between steps, so a pair's image does not depend on its batch; without,
    the latents are the posterior means (deterministic) and there is no noise."""
    sources, skeletons = sources.to(device), skeletons.to(device)
    mean, logvar = encoders.first_stage.moments(sources)  # (N, C, h, w) each
    inputs = {"pose": encoders.pose(skeletons), "image": encoders.image(sources)}
    if seeds is None:
        return dict(inputs, source=mean * encoders.first_stage.scale)
    if len(seeds) != len(sources):
        raise ValueError(f"need one seed per pair: {len(sources)} pairs, {len(seeds)} seeds")
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    source = torch.cat([encoders.first_stage.sample_from_moments(m[None], l[None], generator=g)
                        for m, l, g in zip(mean, logvar, gens)])
    noise = torch.cat([torch.randn(source[:1].shape, generator=g, device=device) for g in gens])
    return dict(inputs, source=source, noise=noise, generator_states=[g.get_state() for g in gens])


class Pipeline:
    """model: an XMDPT; encoders: models.encoders.Encoders; size: the image side S; sample: the defaults of
    the sampling settings (the config's `sample` section: steps, cfg_scale, scale_pow, clip_denoised)."""

    def __init__(self, model, encoders, size, sample, device="cpu", description="X-MDPT", compile=False):
        self.device = torch.device(device)
        self.model, self.encoders = model.to(self.device).eval(), encoders.to(self.device)
        if compile:
            self.model.compile_denoiser()
        self.size, self.sample_defaults, self.description = size, dict(sample), description
        self.diffusion = Diffusion()

    @classmethod
    def from_config(cls, config, checkpoint, device="cpu", compile=False, encoders=None):
        """The pipeline of a config (a YAML path or a loaded dict) and a checkpoint (any file
        models.load_checkpoint reads). The checkpoint is checked against the config before any encoder is
        built, so a mismatch costs no time. encoders: another pipeline's, to share (a student and its teacher
        have the same frozen encoders); None builds the config's."""
        cfg = load_config(config) if isinstance(config, (str, Path)) else config
        ckpt = read_checkpoint(checkpoint)
        check_fits(ckpt.config, model_config(cfg), f"--ckpt {checkpoint}")
        model = strict_load(XMDPT(ckpt.config), ckpt.weights, f"--ckpt {checkpoint}")
        encoders = encoders or build_encoders(cfg["encoders"], device)
        description = f"{cfg['model']['preset']} ({Path(str(checkpoint)).name}, {cfg['data']['size']}px)"
        return cls(model, encoders, cfg["data"]["size"], cfg["sample"], device, description, compile)

    def skeletons(self, keypoints):
        """Keypoints (N, 18, 2) in the DeepFashion convention (data.pose) -> skeletons (N, 3, S, S) in [0, 1]."""
        size = (self.size, self.size)
        return torch.stack([draw_skeleton(to_image_coords(k, size), size) for k in keypoints])

    def encode(self, sources, skeletons, seeds=None):
        """`encode_pairs` with this pipeline's encoders."""
        return encode_pairs(self.encoders, sources, skeletons, seeds, self.device)

    def sampler_for(self, sampler=None):
        """The sampler to use: `sampler` if it fits the model (an InputError that says which fits if not), or
        the model's own, ddim (the released one) for a diffusion model, lcm for a consistency model."""
        sampler = sampler or (CONSISTENCY_SAMPLER if self.model.consistency else "ddim")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if self.model.consistency and sampler != CONSISTENCY_SAMPLER:
            raise InputError(f"{self.description} is a consistency model (distilled to sample in a few steps): it "
                             f"samples with --sampler {CONSISTENCY_SAMPLER}, not {sampler}")
        if not self.model.consistency and sampler == CONSISTENCY_SAMPLER:
            raise InputError(f"--sampler {CONSISTENCY_SAMPLER} samples consistency models, and {self.description} "
                             f"is a diffusion model: use {' or '.join(DIFFUSION_SAMPLERS)}, or its distilled student")
        return sampler

    @torch.no_grad()
    def denoise(self, inputs, steps=None, cfg_scale=None, scale_pow=None, sampler=None, progress=False):
        """Latents from `encode`'s output (with seeds). Settings left None take the config's defaults; sampler:
        'ddim' (the released sampler) or 'dpm++' (DPM-Solver++) for a diffusion model, 'lcm' for a consistency
        model (its guidance is folded in: cfg_scale and scale_pow do not apply); None: the model's own.
        progress: a tqdm bar over the steps."""
        d = self.sample_defaults
        steps, cfg_scale = steps or d["steps"], d["cfg_scale"] if cfg_scale is None else cfg_scale
        scale_pow = d["scale_pow"] if scale_pow is None else scale_pow
        sampler = self.sampler_for(sampler)
        cond = inputs["pose"], inputs["image"], inputs["source"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if sampler == CONSISTENCY_SAMPLER:
                generators = [torch.Generator(self.device).set_state(s) for s in inputs["generator_states"]]
                return consistency_sample(self.diffusion, self.model.conditioned(*cond), inputs["noise"], steps,
                                          generators, d["clip_denoised"], progress)
            fn = self.model.guided(*cond, cfg_scale, scale_pow)
            if sampler == "dpm++":
                return self.diffusion.dpm_solver_sample(fn, inputs["noise"], steps=steps, progress=progress,
                                                        clip_denoised=d["clip_denoised"])
            return self.diffusion.ddim_sample(fn, inputs["noise"], steps=steps, progress=progress,
                                              clip_denoised=d["clip_denoised"])

    @torch.no_grad()
    def decode(self, latents):
        """Latents -> images (N, 3, S, S) in [-1, 1], on the CPU."""
        return self.encoders.first_stage.decode(latents.float()).clamp(-1, 1).cpu()

    def sample(self, inputs, **settings):
        """Images (N, 3, S, S) in [-1, 1], on the CPU, from `encode`'s output: `denoise`, then `decode`."""
        return self.decode(self.denoise(inputs, **settings))

    def __call__(self, sources, skeletons=None, keypoints=None, seeds=(0,), **settings):
        """Generate: sources (N, 3, S, S) in [-1, 1]; the target pose of each as skeletons (N, 3, S, S) in
        [0, 1] or as keypoints (N, 18, 2) in the DeepFashion convention; one seed per pair; `sample`'s
        settings. -> images (N, 3, S, S) in [-1, 1], on the CPU."""
        if (skeletons is None) == (keypoints is None):
            raise ValueError("give the target poses either as skeletons or as keypoints (one of the two)")
        if skeletons is None:
            skeletons = self.skeletons(keypoints)
        expected = (len(sources), 3, self.size, self.size)
        for name, images in (("sources", sources), ("skeletons", skeletons)):
            if tuple(images.shape) != expected:
                raise ValueError(f"{name} must have shape {expected} for this {self.size}px model, "
                                 f"got {tuple(images.shape)}")
        return self.sample(self.encode(sources, skeletons, seeds), **settings)
