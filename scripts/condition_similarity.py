"""How consistent is CANet's condition vector across views of one person? (the paper's fig. 5 analysis)

  python -m scripts.condition_similarity --config configs/xmdpt_s.yaml --ckpt weights/xmdpt_s.pt \\
      --persons 50 --views-per-person 3 --json outputs/condition_similarity.json

Every view (source image) of a person is paired with one and the same target pose, and CANet's unified
condition vector y = CANet(pose, global, local) is computed for each. Reported per representation:

  within   cosine similarity between two views of the same person, averaged over the pairs of views of
           each person, then over persons;
  across   cosine similarity between views of different persons (same target pose): the baseline;
  gap      within - across: how much more alike the views of one person are than two people.

Representations: y itself; CANet's global head and local head alone (the pose head is left out: every view
has the same target pose, so its output is the same vector for all); and, as the untrained reference, the
raw inputs of those heads: the DINOv2 image tokens, mean-pooled, and the flattened source latent. A high
within-person similarity of y only says something if it stands out from the across-person baseline, and
if it is higher than that of the raw features it was built from. Note that y contains the pose head's
output, which is shared by all views and lifts both its within and its across similarity.

A person is an image's parent folder (DeepFashion: img/<group>/<category>/id_XXXXXXXX/). The source
latent is the first stage's posterior mean (no sampling), so the numbers are deterministic.
"""
import argparse
import json
import random
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from configs import CONFIG_DIR, load_config
from data.deepfashion import PairDataset
from data.errors import InputError
from devices import autocast, default_device
from inference import Pipeline

LABELS = {
    "y": "y = CANet(pose, global, local)",
    "global_head": "global head",
    "local_head": "local head",
    "dino_image_mean": "DINOv2 image tokens (mean)",
    "source_latent": "source latent (flattened)",
}


def identity_of(path):
    """The person of an image path: its parent folder."""
    return str(PurePosixPath(path).parent)


def group_by_identity(paths):
    """{identity: sorted image paths}, identities sorted."""
    groups = {}
    for path in sorted(set(paths)):
        groups.setdefault(identity_of(path), []).append(path)
    return dict(sorted(groups.items()))


def split_images(pairs):
    """Every image a pair list names, as target or source."""
    return [path for target, sources in pairs for path in (target, *sources)]


def choose_views(groups, persons, views_per_person, seed, exclude=()):
    """{identity: views}: `persons` identities with at least `views_per_person` images (all of them if
    fewer), not in `exclude`, and `views_per_person` of each one's images, drawn under `seed`."""
    if views_per_person < 2:
        raise InputError(f"need at least 2 views per person, got {views_per_person}")
    eligible = [i for i, paths in groups.items() if len(paths) >= views_per_person and i not in exclude]
    if len(eligible) < 2:
        raise InputError(f"only {len(eligible)} person(s) have {views_per_person} or more images (besides the "
                         f"target pose's person); need at least 2")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(eligible, min(persons, len(eligible))))
    return {i: sorted(rng.sample(groups[i], views_per_person)) for i in chosen}


@torch.no_grad()
def condition_features(pipe, dataset, paths, target_pose, batch_size=16):
    """{representation: (len(paths), dim) float32 on the CPU} of the views `paths` with the skeleton of
    the image `target_pose` as the target pose."""
    skeleton = dataset.skeleton(target_pose)
    features = {}
    for start in tqdm(range(0, len(paths), batch_size), desc="views", unit="batch"):
        images = torch.stack([dataset.load_image(p) for p in paths[start:start + batch_size]])
        inputs = pipe.encode(images, skeleton.expand(len(images), -1, -1, -1))  # latents: posterior means
        with autocast(pipe.device):
            heads = pipe.model.condition_heads(inputs["pose"], inputs["image"], inputs["source"])
            batch = {"y": pipe.model.condition(inputs["pose"], inputs["image"], inputs["source"]),
                     "global_head": heads.get("global"), "local_head": heads.get("local"),
                     "dino_image_mean": inputs["image"].mean(1), "source_latent": inputs["source"].flatten(1)}
        for name, value in batch.items():
            if value is not None:
                features.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(chunks) for name, chunks in features.items()}


def cosine_matrix(x):
    """Pairwise cosine similarities of the rows of x (float64), as 1 - |a - b|^2 / 2 of the unit vectors,
    so that identical rows give exactly 1."""
    unit = F.normalize(x.double(), dim=1)
    dist = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist")
    return (1 - dist ** 2 / 2).clamp(-1, 1)


def similarity_stats(x, persons):
    """within (per person: mean cosine over its pairs of distinct views; then the mean over persons),
    per_person, and across (mean cosine over pairs of views of different persons) for the rows of x,
    `persons` giving each row's person index."""
    sim = cosine_matrix(x)
    persons = torch.as_tensor(persons)
    per_person = []
    for p in persons.unique():
        block = sim[persons == p][:, persons == p]
        per_person.append(block[~torch.eye(len(block), dtype=torch.bool)].mean().item())
    within = sum(per_person) / len(per_person)
    across = sim[persons[:, None] != persons[None, :]].mean().item()
    return {"within": within, "across": across, "gap": within - across, "per_person": per_person}


def analyse(pipe, dataset, persons=50, views_per_person=3, target_pose=None, seed=0, batch_size=16):
    """The analysis on `dataset`'s pairs: target pose (default: the first image of the first person),
    the persons and views chosen, and `similarity_stats` per representation."""
    groups = group_by_identity(split_images(dataset.pairs))
    target_pose = target_pose or next(iter(groups.values()))[0]
    chosen = choose_views(groups, persons, views_per_person, seed, exclude={identity_of(target_pose)})
    paths = [path for views in chosen.values() for path in views]
    index = [p for p, views in enumerate(chosen.values()) for _ in views]
    features = condition_features(pipe, dataset, paths, target_pose, batch_size)
    return {
        "target_pose": target_pose,
        "persons": [{"identity": i, "views": views} for i, views in chosen.items()],
        "similarity": {name: similarity_stats(x, index) for name, x in features.items()},
    }


def format_table(result):
    lines = [f"target pose {result['target_pose']}; {len(result['persons'])} persons x "
             f"{len(result['persons'][0]['views'])} views; mean cosine similarity",
             f"{'representation':<32} {'within':>8} {'across':>8} {'gap':>8}"]
    for name, s in result["similarity"].items():
        lines.append(f"{LABELS[name]:<32} {s['within']:>8.4f} {s['across']:>8.4f} {s['gap']:>8.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"),
                   help="YAML config of the model and encoders (default: configs/demo.yaml)")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a released state dict, our training checkpoint (EMA weights are used) or a "
                        ".safetensors export; it must fit --config")
    p.add_argument("--data", help="dataset root in the DeepFashion layout (default: the config's data.root)")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="whose images: those named by <data>/<split>_pairs.txt (default: test)")
    p.add_argument("--persons", type=int, default=50,
                   help="persons to compare, drawn under --seed among those with enough images (all of them "
                        "if fewer; default: 50)")
    p.add_argument("--views-per-person", type=int, default=3,
                   help="views (source images) per person, drawn under --seed; at least 2 (default: 3)")
    p.add_argument("--target-pose",
                   help="image path, as in the pair files, whose skeleton is the target pose of every view; its "
                        "person is left out of the comparison (default: the first image of the first person)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of persons and views (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="views encoded together (default: 16)")
    p.add_argument("--device", default=str(default_device()),
                   help="torch device (default: cuda if available)")
    p.add_argument("--json", help="also write the result (settings, persons and views, per-person values) here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config)
    pipe = Pipeline.from_config(cfg, args.ckpt, args.device)
    dataset = PairDataset(args.data or cfg["data"]["root"], cfg["data"]["size"], args.split)
    result = analyse(pipe, dataset, args.persons, args.views_per_person, args.target_pose, args.seed,
                     args.batch_size)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("config", "ckpt", "split", "seed")}
        Path(args.json).write_text(json.dumps({**settings, "data": str(dataset.root), **result}, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
