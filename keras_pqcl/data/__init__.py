"""Data pipeline for self-supervised pre-training (DINO, iBOT, PQCL).

Everything runs in ``tf.data`` with TensorFlow ops only, so the same
pipeline feeds ``fit`` under ``KERAS_BACKEND`` = tensorflow, jax or torch.
keras-cv is imported only when a :class:`MultiCrop` with photometric
augmentations is built (never at package import).

Main entry points:

* :func:`pretrain_dataset` - batched multi-crop dataset of dicts;
  ``epochs=E`` makes it a finite stream that resumes exactly at any
  ``start=(epoch, step)`` (:func:`plan_stream`).
* :class:`MultiCropConfig` / :class:`MultiCrop` - the per-example transform.
* :func:`load_source` - folders, numpy arrays, ``"synthetic_scenes"``,
  ``"tfds:NAME"``.
* :func:`synthetic_scenes` - the embedded procedural dataset.
* :class:`MaskConfig` - iBOT block masks (``global_masks``).
* :class:`QueryConfig` - PQCL positional queries (``query_coords``,
  ``query_tables``).
* :func:`tune_input_pipeline` - TensorFlow process settings that make the
  pipeline faster (call before TensorFlow runs any op).
"""

from keras_pqcl.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Photometric,
    color_jitter,
    gaussian_blur,
    normalize,
    photometric_augment,
    solarize,
    to_grayscale,
)
from keras_pqcl.data.crops import (
    crop_and_resize,
    random_resized_crop,
    sample_crop_box,
    sample_crop_boxes,
)
from keras_pqcl.data.masks import (
    MaskConfig,
    block_mask,
    random_mask,
    sample_mask_ratio,
    sample_masks,
)
from keras_pqcl.data.montage import Montage, MontageConfig, assemble_montages, mcl_dataset
from keras_pqcl.data.multicrop import MultiCrop, MultiCropConfig
from keras_pqcl.data.pipeline import StreamPlan, plan_stream, pretrain_dataset, steps_per_epoch
from keras_pqcl.data.queries import QueryConfig, query_coords, sincos_tables
from keras_pqcl.data.runtime import tune_input_pipeline
from keras_pqcl.data.sharding import Shard
from keras_pqcl.data.sources import (
    IMAGE_EXTENSIONS,
    UNSUPPORTED_IMAGE_EXTENSIONS,
    SourceInfo,
    indexed_source,
    list_image_files,
    load_source,
)
from keras_pqcl.data.synthetic import SYNTHETIC_CLASS_NAMES, synthetic_scenes
from keras_pqcl.data.views import densecl_crops

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MaskConfig",
    "Montage",
    "MontageConfig",
    "MultiCrop",
    "MultiCropConfig",
    "Photometric",
    "QueryConfig",
    "SYNTHETIC_CLASS_NAMES",
    "Shard",
    "SourceInfo",
    "StreamPlan",
    "UNSUPPORTED_IMAGE_EXTENSIONS",
    "assemble_montages",
    "block_mask",
    "color_jitter",
    "crop_and_resize",
    "densecl_crops",
    "gaussian_blur",
    "indexed_source",
    "list_image_files",
    "load_source",
    "mcl_dataset",
    "normalize",
    "photometric_augment",
    "plan_stream",
    "pretrain_dataset",
    "query_coords",
    "random_mask",
    "random_resized_crop",
    "sample_crop_box",
    "sample_crop_boxes",
    "sample_mask_ratio",
    "sample_masks",
    "sincos_tables",
    "solarize",
    "steps_per_epoch",
    "synthetic_scenes",
    "tune_input_pipeline",
    "to_grayscale",
]
