"""The ``pqcl_vit_small`` recipe's views against the official PQCL pipeline's.

The official values (``DataAugmentation`` in github.com/Sherrylone/PQCL, README command): both
global crops use one transform (flip 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
grayscale 0.2, Gaussian blur radius U(0.1, 2) always, no solarization); the local crop is
never flipped (jitter 0.8, grayscale 0.2, blur 0.5); 224 px global crops of scale (0.25, 1),
one 96 px local crop of scale (0.05, 0.25), aspect ratio (3/4, 4/3), ImageNet normalisation.
"""

import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_pqcl.data import MultiCrop, MultiCropConfig, QueryConfig
from keras_pqcl.recipe import load_recipe, recipes_dir

OFFICIAL_VIEWS = dict(
    global_size=224,
    local_size=96,
    n_global=2,
    n_local=1,
    global_scale=(0.25, 1.0),
    local_scale=(0.05, 0.25),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    flip_p=0.5,
    flip_local=False,
    color_jitter=(0.4, 0.4, 0.2, 0.1),
    jitter_p=0.8,
    grayscale_p=0.2,
    global_blur_p=(1.0, 1.0),  # the same transform for both global crops
    local_blur_p=0.5,
    blur_sigma=(0.1, 2.0),
    solarize_p=(0.0, 0.0),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
# DINO's asymmetric views, still available with views="dino".
DINO_CHANGES = dict(global_blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2), flip_local=True)


def _module():
    path = os.path.join(recipes_dir(), "pqcl_vit_small.py")
    spec = importlib.util.spec_from_file_location("_pqcl_vit_small_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(recipe):
    return dataclasses.asdict(MultiCropConfig(**recipe.crops))


def test_default_views_are_the_official_ones():
    recipe = load_recipe("pqcl_vit_small")
    config = _config(recipe)
    for name, value in OFFICIAL_VIEWS.items():
        assert config[name] == pytest.approx(value), name
    # The official queries (flip_correct=False) are possible with these views.
    MultiCrop(MultiCropConfig(**recipe.crops), queries=QueryConfig(16, flip_correct=False))


@pytest.mark.parametrize("how", ["argument", "derive"])
def test_dino_views_are_an_option(how):
    module = _module()
    if how == "argument":
        recipe = module.get_recipe(views="dino")
    else:
        recipe = load_recipe("pqcl_vit_small").derive(crops=module.DINO_VIEWS)
    config = _config(recipe)
    for name, value in {**OFFICIAL_VIEWS, **DINO_CHANGES}.items():
        assert config[name] == pytest.approx(value), name
    # Only the views differ from the default recipe.
    default = module.get_recipe()
    assert dataclasses.replace(recipe, crops=default.crops) == default
    with pytest.raises(ValueError, match="views must be one of"):
        module.get_recipe(views="ibot")


def test_official_views_as_sampled():
    """Both global crops always blurred and never solarized, local crops never flipped (the
    recipe's views on small crops, recorded per image)."""
    crops = {**load_recipe("pqcl_vit_small").crops, "global_size": 32, "local_size": 16, "n_local": 3}
    transform = MultiCrop(MultiCropConfig(**crops, use_keras_cv=False), record_augmentations=True)
    image = np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)
    global_flips, local_blur = [], []
    for seed in range(16):
        out = {k: v.numpy() for k, v in transform(image, -1, tf.constant([seed, 0])).items()}
        np.testing.assert_array_equal(out["global_augs"][:, 2], 1)  # blur
        np.testing.assert_array_equal(out["global_augs"][:, 3], 0)  # solarize
        np.testing.assert_array_equal(out["local_flips"], 0)
        global_flips.extend(out["global_flips"])
        local_blur.extend(out["local_augs"][:, 2])
    assert 0 < np.mean(global_flips) < 1 and 0 < np.mean(local_blur) < 1
