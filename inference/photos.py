"""Your own photos through the pipeline, as infer_xmdpt.py and the web app both run them.

The source photo must show a person; it is framed around them (data/photo.py). The target pose comes from a
keypoint file (DeepFashion .txt or OpenPose .json, in the DeepFashion convention) or from another photo,
framed the same way, so that the pose sits in the frame as that person sat in theirs. The poses found on
photos can be written as OpenPose JSON with a skeleton drawn over the framed photo, to check, correct and pass
back with --target-pose.
"""
from pathlib import Path

from data.photo import fit_photo, frame_photo
from data.pose import draw_skeleton, load_keypoints, overlay, require_joints, save_openpose_json, to_image_coords
from inference.pairs import save_png

MIN_JOINTS = 4  # a target pose with fewer visible joints says too little to be drawn
VIEW_SIZE = 256  # the smallest side overlays are drawn at, so that a skeleton can be checked by eye


def source_photo(rgb, size, name="source photo", framing="person"):
    """The source as a model input (a data.photo.FramedPhoto); a ValueError naming it if it shows no one."""
    return frame_photo(rgb, size, name, framing)


def pose_photo(rgb, size, name="pose photo", framing="person"):
    """The person of a photo whose pose is the target, framed as a source would be (at least MIN_JOINTS)."""
    return frame_photo(rgb, size, name, framing, min_joints=MIN_JOINTS)


def pose_file(path):
    """Target keypoints (18, 2) from a DeepFashion .txt or OpenPose .json file (at least MIN_JOINTS)."""
    keypoints = load_keypoints(path)
    require_joints(keypoints, str(path), MIN_JOINTS, "in the file")
    return keypoints


def generate(pipe, source, keypoints, seed=0, **settings):
    """The source's person in the target pose: an image (3, S, S) in [-1, 1]; settings go to the sampler."""
    return pipe(source.image[None], keypoints=[keypoints], seeds=[seed], **settings)[0]


def pose_overlay(rgb, framed):
    """The photo `rgb`, framed as `framed` was, with the skeleton of its keypoints drawn over it, at a side of
    at least VIEW_SIZE: (3, V, V) in [-1, 1]."""
    size = max(framed.fit.size, VIEW_SIZE)
    image, _ = fit_photo(rgb, size, framed.fit.crop)
    return overlay(image, draw_skeleton(to_image_coords(framed.keypoints, (size, size)), (size, size)))


def save_pose(rgb, framed, folder, stem):
    """Write a photo's keypoints as `{folder}/{stem}.json` (OpenPose format, DeepFashion convention) and its
    overlay as `{folder}/{stem}_skeleton.png`; returns the JSON's path."""
    folder = Path(folder)
    save_openpose_json(framed.keypoints, folder / f"{stem}.json")
    save_png(pose_overlay(rgb, framed), folder / f"{stem}_skeleton.png")
    return folder / f"{stem}.json"
