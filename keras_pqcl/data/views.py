"""Augmentation presets that name a paper's two-view setting as a :class:`MultiCropConfig`."""

from keras_pqcl.data.multicrop import MultiCropConfig


def densecl_crops(size=224, **overrides):
    """MoCo-v2 views as DenseCL trains with them: two crops per image, the same
    augmentation for both, sampled independently.

    RandomResizedCrop to ``size`` with area (0.2, 1) and aspect (3/4, 4/3); colour jitter
    (0.4, 0.4, 0.4, 0.1) with p 0.8; grayscale p 0.2; Gaussian blur sigma U(0.1, 2) with p 0.5
    on both views; horizontal flip p 0.5; no solarisation; ImageNet normalisation. The batch
    key is ``"global_crops"`` ``(B, 2, size, size, 3)``. ``overrides`` replace any field
    (e.g. ``blur_sigma`` scaled down for tiny images).
    """
    args = dict(
        global_size=size,
        n_global=2,
        n_local=0,
        global_scale=(0.2, 1.0),
        color_jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_p=0.8,
        grayscale_p=0.2,
        global_blur_p=(0.5, 0.5),
        blur_sigma=(0.1, 2.0),
        solarize_p=(0.0, 0.0),
        flip_p=0.5,
    )
    args.update(overrides)
    return MultiCropConfig(**args)
