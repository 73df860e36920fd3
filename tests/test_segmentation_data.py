"""Segmentation data (kp.tasks.data): aligned image+mask augmentation and input checks."""

import numpy as np
import pytest
from PIL import Image

from keras_pqcl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from keras_pqcl.tasks import data as seg_data

IGNORE = 255
SIZE = 16


def coordinate_images(n=4):
    """Images whose channel 0 is the row and channel 1 the column (in pixels, / 15); masks are
    the row index, so any misalignment of image and mask shows."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    image = np.stack([rows / (SIZE - 1), cols / (SIZE - 1), np.full(rows.shape, 0.5)], -1).astype(np.float32)
    return np.repeat(image[None], n, 0), np.repeat(rows[None].astype(np.uint8), n, 0)


def decoded(batch_images, channel):
    """Undo the ImageNet normalisation and the /15 of :func:`coordinate_images`."""
    x = np.asarray(batch_images)[..., channel] * IMAGENET_STD[channel] + IMAGENET_MEAN[channel]
    return x * (SIZE - 1)


@pytest.mark.parametrize("crop,scales,tol", [(12, (1.0, 1.0), 1e-3), (20, (0.5, 2.0), 1.0)])
def test_image_and_mask_stay_aligned(crop, scales, tol):
    images, masks = coordinate_images()
    ds = seg_data.segmentation_dataset(
        images, masks, num_classes=SIZE, batch_size=4, crop_size=crop, scale_range=scales, photometric=False, seed=3
    )
    flipped = padded = 0
    for _ in range(3):  # epochs draw new augmentations
        for x, y in ds:
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == (4, crop, crop, 3) and x.dtype == np.float32 and y.shape == (4, crop, crop)
            labelled = y != IGNORE
            padded += int((~labelled).any())
            np.testing.assert_allclose(decoded(x, 0)[labelled], y[labelled], atol=tol)
            cols = decoded(x, 1)
            flipped += int((cols[:, :, 0] > cols[:, :, -1]).any())
    assert flipped  # the flip moved columns and the rows (the mask) still matched
    if crop > SIZE:
        assert padded


def test_photometric_changes_the_image_only():
    images, masks = coordinate_images()
    args = dict(num_classes=SIZE, batch_size=4, crop_size=12, seed=5, shuffle=False)
    plain = next(iter(seg_data.segmentation_dataset(images, masks, photometric=False, **args)))
    jittered = next(iter(seg_data.segmentation_dataset(images, masks, photometric=True, **args)))
    np.testing.assert_array_equal(np.asarray(plain[1]), np.asarray(jittered[1]))
    assert not np.allclose(np.asarray(plain[0]), np.asarray(jittered[0]))


def test_evaluation_batches_are_the_whole_normalised_images():
    data = seg_data.synthetic_segmentation(3, image_size=16, num_classes=2)
    assert data["num_classes"] == 3
    x, y = next(iter(seg_data.segmentation_dataset(data["images"], data["masks"], 3, batch_size=3, training=False)))
    expected = (data["images"] / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(np.asarray(x), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y), data["masks"])


def test_bad_masks_are_one_error_naming_the_file(tmp_path):
    images, masks = coordinate_images(2)
    with pytest.raises(ValueError, match="mask of 'b.png' has shape \\(8, 16\\)"):
        seg_data.check_masks(images, [masks[0], masks[1][:8]], SIZE, names=["a.png", "b.png"])
    bad = np.zeros_like(masks)
    bad[1, 2, 3] = 15
    bad[0, 0, 0] = IGNORE  # the ignore index is no class id, and allowed
    with pytest.raises(ValueError, match="mask of sample 1 holds class id 15, outside \\[0, 4\\)"):
        seg_data.segmentation_dataset(images, bad, num_classes=4)

    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "img" / f"{name}.jpg")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[0, 0] = 7
    Image.fromarray(mask).save(tmp_path / "ann" / "a.png")
    with pytest.raises(ValueError, match="1 image\\(s\\) without a mask \\(e.g. b\\)"):
        seg_data.segmentation_folder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=4)
    Image.fromarray(mask).save(tmp_path / "ann" / "b.png")
    with pytest.raises(ValueError, match="ann/a' holds class id 7"):
        seg_data.segmentation_folder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=4)
    Image.fromarray(mask[:8]).save(tmp_path / "ann" / "b.png")
    with pytest.raises(ValueError, match="b.png' is 16x8; a mask must have its image's size"):
        seg_data.segmentation_folder(str(tmp_path / "img"), str(tmp_path / "ann"), num_classes=8)
