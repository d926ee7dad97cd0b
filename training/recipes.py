"""A config's recipe: the objective a run trains with, and the weights its model starts from.

Without a `distill` section it is X-MDPT's loss on a freshly initialised model. With one, the model is a few-step
student distilled from `distill.teacher` (any checkpoint the loader reads; MIPNet, which only trains the teacher,
left out), by `distill.method`:
- consistency (models/consistency.py): the student starts from the teacher's weights;
- dmd2 (models/dmd2.py): the student starts from `distill.student` (a consistency student, say) or, when that is
  null, from the teacher's weights; the fake score starts from the teacher's.
"""
from dataclasses import replace

from configs import distill_method
from data.errors import InputError
from models import XMDPT, Diffusion
from models.consistency import ConsistencyDistillation
from models.dmd2 import DMD2
from models.objective import XMDPTLoss
from models.weights import check_fits, read_checkpoint, strict_load


def build_objective(cfg, model, ema):
    """The objective of a training config for `model` and its EMA; a distillation's student (`model`) gets the
    weights it starts from here, and the caller starts the EMA from the model afterwards."""
    distill = cfg.get("distill")
    if distill is None:
        return XMDPTLoss(model, Diffusion())
    teacher = teacher_of(distill["teacher"], model)
    guidance = distill["cfg_scale"], distill["scale_pow"]
    clip_denoised = cfg["sample"]["clip_denoised"]
    if distill_method(cfg) == "consistency":
        model.load_state_dict(teacher.state_dict())
        return ConsistencyDistillation(model, ema, teacher, Diffusion(), *guidance, distill["loss"],
                                       distill["huber_c"], distill["weighting"], clip_denoised)
    if distill["student"] is None:
        model.load_state_dict(teacher.state_dict())
    else:
        source = f"distill.student {distill['student']}"
        start = read_checkpoint(distill["student"])
        check_fits(start.config, model.config, source, "the student (the model section)")
        strict_load(model, start.weights, source)
    fake_score = XMDPT(teacher.config).to(next(model.parameters()).device)
    fake_score.load_state_dict(teacher.state_dict())
    return DMD2(model, teacher, fake_score, Diffusion(), cfg["sample"]["steps"], distill["ratio"], *guidance,
                distill["fake_lr"], cfg["train"]["grad_clip"], distill["gan_weight"], distill["head_weight"],
                clip_denoised)


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
