"""PQCL end to end: through the pipeline and the model's own token order, each query's sin-cos
position and the teacher patch it must predict show the same source pixels (issue 5).

The image encodes its own coordinates (channel 0 = row, channel 1 = column). On the query
side, the test decodes each query token the model builds (minus the mask token) back to a
position by nearest match on a fine grid of sin-cos codes, and reads the global view there.
On the target side, the model's ``teacher_local_patches`` runs with a stand-in teacher whose
"logits" for a patch are the patch's mean coordinates, so the target order is the model's.
"""

import types

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_pqcl as kp
from keras_pqcl.data import MultiCrop, MultiCropConfig, QueryConfig
from keras_pqcl.models.terms import StepOutputs

from tests import helpers

PATCH, GLOBAL, LOCAL, N_LOCAL, DIM = 8, 64, 32, 2, 64


def _decode(tables, dim, lo=-2.0, hi=GLOBAL // PATCH + 2.0, step=0.02):
    """Positions (x, y) whose sin-cos code is nearest to each row of ``tables`` (T, dim)."""
    grid = np.arange(lo, hi, step)
    half = dim // 2
    # The x and y halves are independent, so each coordinate is decoded on its own axis.
    codes = helpers.mae_sincos(grid, grid, dim)
    x = grid[np.argmin(((tables[:, None, :half] - codes[None, :, :half]) ** 2).sum(-1), axis=1)]
    y = grid[np.argmin(((tables[:, None, half:] - codes[None, :, half:]) ** 2).sum(-1), axis=1)]
    return np.stack([x, y], -1)


def _model():
    backbone = kp.backbones.VisionTransformer(
        patch_size=PATCH,
        embed_dim=DIM,
        depth=1,
        num_heads=2,
        image_size=GLOBAL,
        pos_embed="sincos",
        use_mask_token=True,
    )
    return kp.models.PQCL(backbone, base="dino", out_dim=2, hidden_dim=8, bottleneck_dim=4)


def _coordinate_teacher():
    """Stand-in teacher: each local patch's "logits" are its mean (row, col)."""

    def backbone(crops, training=False):
        crops = ops.convert_to_numpy(crops)
        n, h, w, _ = crops.shape
        grid = crops[..., :2].reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, 2).mean((2, 4))
        return {"patches": ops.convert_to_tensor(grid.reshape(n, -1, 2))}

    head = types.SimpleNamespace(token_logits=lambda x: x)
    return types.SimpleNamespace(teacher_backbone=backbone, teacher_head=head, out_dim=2)


@pytest.mark.parametrize("flip_correct", [True, False])
def test_query_positions_and_targets_show_the_same_pixels(flip_correct):
    model = _model()
    mask_token = ops.convert_to_numpy(model.student_backbone.mask_token).reshape(-1)
    cfg = MultiCropConfig(
        global_size=GLOBAL,
        local_size=LOCAL,
        n_local=N_LOCAL,
        global_scale=(0.5, 1.0),
        local_scale=(0.1, 0.3),
        flip_local=flip_correct,  # the official queries assume unflipped local crops
        use_keras_cv=False,
    )
    crops = MultiCrop(cfg, photometric=False, normalize=False, queries=QueryConfig(PATCH, flip_correct=flip_correct))
    image = helpers.coord_image(120, 100)
    L, G = LOCAL // PATCH, GLOBAL // PATCH
    errors = {True: [], False: []}
    for seed in range(0, 8, 2):
        # Two different crop draws per batch, so batch and crop axes cannot be confused.
        draws = [crops(image, -1, tf.constant([seed + b, 3])) for b in range(2)]
        example = {k: np.stack([d[k].numpy() for d in draws]) for k in draws[0]}
        global_crops, local_crops = example["global_crops"], example["local_crops"]
        step = StepOutputs(example, 0, global_crops.shape[1], global_crops.shape[0])
        queries = ops.convert_to_numpy(model.term("query").query_tokens(model, step)[0])
        targets = ops.convert_to_numpy(
            kp.models.PQCL.teacher_local_patches(_coordinate_teacher(), local_crops)
        )  # (B, T, 2)
        for g in range(2):
            for b in range(2):
                positions = _decode(queries[g * 2 + b] - mask_token, DIM)  # views-major rows
                view, gbox = global_crops[b, g], example["global_boxes"][b, g]
                flipped = bool(example["global_flips"][b, g] or example["local_flips"][b].any())
                for t, (x, y) in enumerate(positions):
                    lbox = example["local_boxes"][b, t // (L * L)]
                    # Query cells are local patches: their size in global-patch units.
                    sx, sy = (lbox[3] / L) / (gbox[3] / G), (lbox[2] / L) / (gbox[2] / G)
                    cy, cx = (y + sy / 2) * PATCH, (x + sx / 2) * PATCH
                    if not (0 <= cx <= GLOBAL and 0 <= cy <= GLOBAL):
                        continue  # the local patch lies outside this view
                    seen = helpers.bilinear(view[..., :2], cy, cx)
                    errors[flipped].append(np.abs(seen - targets[b, t]).max())
    assert len(errors[False]) > 30 and len(errors[True]) > 30, {k: len(v) for k, v in errors.items()}
    assert np.percentile(errors[False], 95) < 1.5
    if flip_correct:
        assert np.percentile(errors[True], 95) < 1.5
    else:
        # The official geometry points at the mirrored place once anything is flipped.
        assert np.median(errors[True]) > 5.0
