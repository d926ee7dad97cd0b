"""The inference pipeline: X-MDPT and its frozen encoders, loaded once; source images and target poses in,
images of the sources' people in the target poses out. infer_xmdpt.py, the web app, training's sample grids
and the analysis scripts all generate through it.

What the model reads of a pair splits in two. Its source's part (DINOv2-G tokens and the first stage's posterior,
`encode_sources`) is most of the work of encoding and depends on the photo alone, so it is computed once per
distinct photo and shared by all of that photo's poses; the pose's part (DINOv2-B tokens of the skeleton,
`encode_poses`) is computed per pose. `pair_inputs` puts them together, each pair drawing its source latent and
its noise from its own seed, so an image is the same whether its source was encoded alone or shared.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from configs import load_config, model_config
from data.errors import InputError
from data.pose import draw_skeleton, to_image_coords
from devices import autocast
from models import XMDPT, Diffusion
from models.consistency import consistency_sample, lcm_timesteps
from models.diffusion import ddim_timesteps
from models.encoders import build_encoders
from models.weights import check_fits, read_checkpoint, strict_load

# The samplers of diffusion models, and that of consistency models (models/consistency.py).
DIFFUSION_SAMPLERS, CONSISTENCY_SAMPLER = ("ddim", "dpm++"), "lcm"
SAMPLERS = (*DIFFUSION_SAMPLERS, CONSISTENCY_SAMPLER)
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG, DEMO_CHECKPOINT = ROOT / "configs" / "demo.yaml", ROOT / "assets" / "xmdpt_demo"
FAST_DEMO_CONFIG, FAST_DEMO_CHECKPOINT = ROOT / "configs" / "dmd2_demo.yaml", ROOT / "assets" / "xmdpt_demo_fast"


def add_model_arguments(parser):
    """--config, --ckpt (both, or neither for the bundled demo model; see `model_files`), --fast and --device."""
    parser.add_argument("--config", help="YAML config of the model and encoders (default: the demo's)")
    parser.add_argument("--ckpt", help="a released state dict (.pt), our training checkpoint (EMA weights are used) "
                                       "or an export folder (default: the bundled demo model, assets/xmdpt_demo)")
    parser.add_argument("--fast", action="store_true",
                        help="the bundled fast demo model instead (assets/xmdpt_demo_fast, configs/dmd2_demo.yaml): "
                             "the demo model distilled to sample in 4 steps")
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
def encode_sources(encoders, images):
    """What the model reads of source images (N, 3, S, S) in [-1, 1], whatever the pose: their DINOv2 tokens
    (`image`) and their first stage's posterior moments (`mean`, `logvar`), from which each pair draws its latent."""
    mean, logvar = encoders.first_stage.moments(images)  # (N, C, h, w) each
    return {"image": encoders.image(images), "mean": mean, "logvar": logvar}


@torch.no_grad()
def pair_inputs(first_stage, sources, poses, seeds=None):
    """The model's inputs for N pairs: `sources`, `encode_sources`' output with one row per pair (a photo shared by
    several pairs repeats its row), and the pose tokens (N, 257, pose_dim) of their target skeletons. With `seeds`
    (one int per pair), each pair's generator draws its source's posterior sample, then its starting noise
    (`noise`), and its state is kept (`generator_states`) for the noise a consistency sampler adds between steps,
    so a pair's image depends on neither its batch nor which pairs share its source; without, the source latents
    are the posterior means (deterministic) and there is no noise."""
    mean, logvar = sources["mean"], sources["logvar"]
    inputs = {"pose": poses, "image": sources["image"]}
    if seeds is None:
        return dict(inputs, source=mean * first_stage.scale)
    if len(seeds) != len(mean):
        raise ValueError(f"need one seed per pair: {len(mean)} pairs, {len(seeds)} seeds")
    gens = [torch.Generator(mean.device).manual_seed(int(s)) for s in seeds]
    source = torch.cat([first_stage.sample_from_moments(m[None], l[None], generator=g)
                        for m, l, g in zip(mean, logvar, gens)])
    noise = torch.cat([torch.randn(source[:1].shape, generator=g, device=mean.device) for g in gens])
    return dict(inputs, source=source, noise=noise, generator_states=[g.get_state() for g in gens])


@torch.no_grad()
def encode_pairs(encoders, sources, skeletons, seeds=None, device="cpu"):
    """`pair_inputs` of pairs of sources (N, 3, S, S) in [-1, 1] and target skeletons (N, 3, S, S) in [0, 1], each
    source encoded with its pair."""
    sources, skeletons = sources.to(device), skeletons.to(device)
    return pair_inputs(encoders.first_stage, encode_sources(encoders, sources), encoders.pose(skeletons), seeds)


@dataclass(frozen=True)
class Sampling:
    """A run's sampling settings, resolved (`Pipeline.settings`): the sampler, its steps, the guidance scale and
    power (None for a consistency model, whose guidance is folded into its weights), and whether each clean
    estimate is clamped to [-1, 1]."""
    sampler: str
    steps: int
    cfg_scale: float | None
    scale_pow: float | None
    clip_denoised: bool


class Pipeline:
    """model: an XMDPT; encoders: models.encoders.Encoders; size: the image side S; sample: the defaults of
    the sampling settings (the config's `sample` section: steps, cfg_scale, scale_pow, clip_denoised)."""

    def __init__(self, model, encoders, size, sample, device="cpu", description="X-MDPT", compile=False,
                 checkpoint=None):
        self.device = torch.device(device)
        self.checkpoint = checkpoint  # the weights' file or folder, as a full path, when they came from one
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
        return cls(model, encoders, cfg["data"]["size"], cfg["sample"], device, description, compile,
                   str(Path(str(checkpoint)).resolve()))

    def skeletons(self, keypoints):
        """Keypoints (N, 18, 2) in the DeepFashion convention (data.pose) -> skeletons (N, 3, S, S) in [0, 1]."""
        size = (self.size, self.size)
        return torch.stack([draw_skeleton(to_image_coords(k, size), size) for k in keypoints])

    def check_images(self, name, images):
        """A ValueError naming `name` unless `images` is (N, 3, S, S) at this pipeline's size."""
        expected = (3, self.size, self.size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{name} must have shape (N, {', '.join(map(str, expected))}) for this {self.size}px "
                             f"model, got {tuple(images.shape)}")

    def encode_sources(self, images):
        """`encode_sources` of source images (N, 3, S, S) in [-1, 1] with this pipeline's encoders."""
        self.check_images("sources", images)
        return encode_sources(self.encoders, images.to(self.device))

    @torch.no_grad()
    def encode_poses(self, skeletons):
        """The DINOv2 tokens (N, 257, pose_dim) of target skeletons (N, 3, S, S) in [0, 1]."""
        self.check_images("skeletons", skeletons)
        return self.encoders.pose(skeletons.to(self.device))

    def pair_inputs(self, sources, poses, seeds=None):
        """`pair_inputs` with this pipeline's first stage."""
        return pair_inputs(self.encoders.first_stage, sources, poses, seeds)

    def encode(self, sources, skeletons, seeds=None):
        """The inputs of pairs of source images and target skeletons, each source encoded with its pair."""
        return self.pair_inputs(self.encode_sources(sources), self.encode_poses(skeletons), seeds)

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

    def settings(self, *, sampler=None, steps=None, cfg_scale=None, scale_pow=None):
        """The sampling settings, resolved here once for the command line, the app and the scripts alike: a
        setting left None takes the config's `sample` default, the sampler the model's own (`sampler_for`). A
        guidance scale or power given for a consistency model, or a step count its sampler cannot take, is an
        InputError."""
        d, sampler = self.sample_defaults, self.sampler_for(sampler)
        steps = d["steps"] if steps is None else steps
        if self.model.consistency:
            if cfg_scale is not None or scale_pow is not None:
                raise InputError(f"the guidance scale and power do not apply to {self.description}: a consistency "
                                 f"model has the guidance it was distilled with folded into its weights")
            lcm_timesteps(self.diffusion.num_timesteps, steps)
            return Sampling(sampler, steps, None, None, d["clip_denoised"])
        ddim_timesteps(self.diffusion.num_timesteps, steps)
        return Sampling(sampler, steps, d["cfg_scale"] if cfg_scale is None else cfg_scale,
                        d["scale_pow"] if scale_pow is None else scale_pow, d["clip_denoised"])

    @torch.no_grad()
    def sample(self, inputs, *, settings=None, progress=False):
        """Latents from `encode`'s or `pair_inputs`' output (with seeds), sampled as `settings` (a `Sampling`;
        None: the defaults, `settings()`) says. progress: a tqdm bar over the steps."""
        s = settings or self.settings()
        cond = inputs["pose"], inputs["image"], inputs["source"]
        with autocast(self.device):
            if s.sampler == CONSISTENCY_SAMPLER:
                generators = [torch.Generator(self.device).set_state(g) for g in inputs["generator_states"]]
                return consistency_sample(self.diffusion, self.model.conditioned(*cond), inputs["noise"], s.steps,
                                          generators, s.clip_denoised, progress)
            fn = self.model.guided(*cond, s.cfg_scale, s.scale_pow)
            solver = self.diffusion.dpm_solver_sample if s.sampler == "dpm++" else self.diffusion.ddim_sample
            return solver(fn, inputs["noise"], steps=s.steps, progress=progress, clip_denoised=s.clip_denoised)

    @torch.no_grad()
    def decode(self, latents):
        """Latents -> images (N, 3, S, S) in [-1, 1], on the CPU."""
        return self.encoders.first_stage.decode(latents.float()).clamp(-1, 1).cpu()

    def in_poses(self, features, skeletons, *, seed=0, settings=None, progress=False):
        """One photo in many poses: `features`, the photo's `encode_sources` (one image, computed once for all
        its poses), and target skeletons (N, 3, S, S) in [0, 1]; every image's noise from `seed`, so that an image
        depends on the photo, the pose and the seed alone. -> images (N, 3, S, S) in [-1, 1], on the CPU."""
        n = len(skeletons)
        shared = {k: v.expand(n, *v.shape[1:]) for k, v in features.items()}  # one row per pose, not copied
        inputs = self.pair_inputs(shared, self.encode_poses(skeletons), [seed] * n)
        return self.decode(self.sample(inputs, settings=settings, progress=progress))

    def __call__(self, sources, *, skeletons=None, keypoints=None, seeds=(0,), settings=None, progress=False):
        """Generate: sources (N, 3, S, S) in [-1, 1]; the target pose of each as skeletons (N, 3, S, S) in
        [0, 1] or as keypoints (N, 18, 2) in the DeepFashion convention; one seed per pair; the sampling
        `settings` (a `Sampling`; None: the defaults). -> images (N, 3, S, S) in [-1, 1], on the CPU."""
        if (skeletons is None) == (keypoints is None):
            raise ValueError("give the target poses either as skeletons or as keypoints (one of the two)")
        if skeletons is None:
            skeletons = self.skeletons(keypoints)
        if len(skeletons) != len(sources):
            raise ValueError(f"need one target pose per source: {len(sources)} sources, {len(skeletons)} poses")
        inputs = self.encode(sources, skeletons, seeds)
        return self.decode(self.sample(inputs, settings=settings, progress=progress))
