"""Data: the datasets on disk (DeepFashion, the synthetic set, the feature cache), pose keypoints and skeletons,
own photos, and the input and output beneath them (LMDB, atomic writes, images, user errors)."""
