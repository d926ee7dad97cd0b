"""Target poses for your own photos, as infer_xmdpt.py and the web app both take them: from a keypoint file
(DeepFashion .txt or OpenPose .json, in the DeepFashion convention), a folder of them, or from another photo,
framed as a source is framed (data/photo.py), so that the pose sits in the frame as that person sat in theirs.
The pose found on a photo can be saved as OpenPose JSON with its skeleton drawn over the framed photo, to check,
correct and pass back with --target-pose. One photo in many poses comes with a contact sheet.
"""
from pathlib import Path

import torch
import torch.nn.functional as F

from data.errors import InputError
from data.images import save_png
from data.photo import dataset_photo, fit_photo, frame_photo
from data.pose import draw_skeleton, load_keypoints, overlay, require_joints, save_openpose_json, to_image_coords

MIN_JOINTS = 4  # a target pose with fewer visible joints says too little to be drawn
VIEW_SIZE = 256  # the smallest side overlays are drawn at, so that a skeleton can be checked by eye
KEYPOINT_SUFFIXES = (".txt", ".json")


def pose_from_photo(rgb, size, name="pose photo", framing="person"):
    """The person of a photo whose pose is the target: a data.photo.FramedPhoto whose `keypoints` are the pose.
    An InputError naming the photo when it shows no one, or fewer than MIN_JOINTS joints."""
    return frame_photo(rgb, size, name, framing, min_joints=MIN_JOINTS)


def pose_from_file(path):
    """The target keypoints (18, 2) of a DeepFashion .txt or OpenPose .json file. An InputError naming the file
    when it holds fewer than MIN_JOINTS joints."""
    keypoints = load_keypoints(path)
    require_joints(keypoints, str(path), MIN_JOINTS, "in the file")
    return keypoints


def pose_files(paths):
    """The keypoint files that `paths` name: files as they are, and for a folder the .txt and .json files in it,
    sorted by name. An InputError for a folder that holds none, and for two poses of the same name, which would
    write the same image."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in KEYPOINT_SUFFIXES and p.is_file())
            if not found:
                raise InputError(f"{path}: no keypoint files (.txt or .json) in the folder")
            files += found
        else:
            files.append(path)
    unique_names(files)
    return files


def unique_names(paths):
    """An InputError when two of `paths` share a stem: their images would be written under one name."""
    stems = [Path(p).stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        same = ", ".join(str(p) for p in paths if Path(p).stem == twice[0])
        raise InputError(f"two target poses share the name {twice[0]!r} ({same}): their images would overwrite "
                         f"each other; rename one")


def contact_sheet(source, poses):
    """One photo in many poses, side by side: the source image (3, S, S), then each (keypoints, generated image)
    of `poses` with the pose's skeleton drawn over its image; each tile at a side of at least VIEW_SIZE (nearest
    neighbour, so that small images stay crisp). -> (3, V, V (1 + len(poses))) in [-1, 1]."""
    view = max(source.shape[-1], VIEW_SIZE)
    resize = lambda image: F.interpolate(image[None].float(), size=(view, view), mode="nearest")[0]
    tiles = [resize(source)]
    for keypoints, image in poses:
        tiles.append(overlay(resize(image), draw_skeleton(to_image_coords(keypoints, (view, view)), (view, view))))
    return torch.cat(tiles, dim=-1)


def pose_overlay(rgb, framed):
    """The photo `rgb`, framed as `framed` was, with the skeleton of its keypoints drawn over it, at a side of
    at least VIEW_SIZE: (3, V, V) in [-1, 1]."""
    size = max(framed.image.shape[-1], VIEW_SIZE)
    image = fit_photo(rgb, size, framed.fit.crop)[0] if framed.fit else dataset_photo(rgb, framed.keypoints, size).image
    return overlay(image, draw_skeleton(to_image_coords(framed.keypoints, (size, size)), (size, size)))


def save_pose(rgb, framed, folder, stem):
    """Write a photo's keypoints as `{folder}/{stem}.json` (OpenPose format, DeepFashion convention) and its
    overlay as `{folder}/{stem}_skeleton.png`; returns the JSON's path."""
    folder = Path(folder)
    save_openpose_json(framed.keypoints, folder / f"{stem}.json")
    save_png(pose_overlay(rgb, framed), folder / f"{stem}_skeleton.png")
    return folder / f"{stem}.json"
