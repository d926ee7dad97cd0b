"""A config's recipe: the objective a run trains with, and the weights its model starts from.

Without a `distill` section it is X-MDPT's loss on a freshly initialised model. With one, the model is a student
distilled from `distill.teacher` (any checkpoint the loader reads), and starts from the teacher's weights
(MIPNet, which only trains the teacher, left out): consistency distillation (models/consistency.py).
"""
from dataclasses import replace

from data.errors import InputError
from models import XMDPT, Diffusion
from models.consistency import ConsistencyDistillation
from models.objective import XMDPTLoss
from models.weights import check_fits, read_checkpoint, strict_load


def build_objective(cfg, model, ema):
    """The objective of a training config for `model` and its EMA; a distillation's student (`model`) gets the
    weights it starts from here, and the caller starts the EMA from the model afterwards."""
    distill = cfg.get("distill")
    if distill is None:
        return XMDPTLoss(model, Diffusion())
    teacher = teacher_of(distill["teacher"], model)
    model.load_state_dict(teacher.state_dict())
    return ConsistencyDistillation(model, ema, teacher, Diffusion(), distill["cfg_scale"], distill["scale_pow"],
                                   distill["loss"], distill["huber_c"], distill["weighting"],
                                   cfg["sample"]["clip_denoised"])


def teacher_of(path, student):
    """The diffusion model at `path`, built without MIPNet (it samples; MIPNet only trains), on the student's
    device; refused when it is a consistency model already or does not fit the student's architecture."""
    source = f"distill.teacher {path}"
    ckpt = read_checkpoint(path)
    if ckpt.config.consistency:
        raise InputError(f"{source} is a consistency model already; distil the diffusion model it came from")
    check_fits(ckpt.config, replace(student.config, consistency=False), source, "the student (the model section)")
    sampling = {k: v for k, v in ckpt.weights.items() if not k.startswith("mipnet.")}
    teacher = strict_load(XMDPT(replace(ckpt.config, mipnet="none")), sampling, source)
    return teacher.to(next(student.parameters()).device)
