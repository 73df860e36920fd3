"""iBOT+PQCL ViT-S/16, the PQCL README run (Zhang et al., ICML 2023; github.com/Sherrylone/PQCL).

8 GPUs x 64 = 512 images per step, 100 epochs, ViT-S/16 with the fixed sin-cos position table
(``pos_small``), 2 x 224 (0.25-1) global crops and ONE 96 px local crop (0.05-0.25) whose 36
patches become the query tokens of each global view; iBOT block masks; one shared head with
8192 prototypes; teacher temperatures (CLS, patch, query) 0.04 -> 0.07 over 30 epochs;
lambda1 = lambda2 = lambda3 = 1. Pass your data with --data.

Views. By default (``views="official"``) they are the official pipeline's: both global crops
go through one and the same transform (flip 0.5, colour jitter 0.8, grayscale 0.2, Gaussian
blur always, no solarization) and the local crop is never flipped (jitter 0.8, grayscale 0.2,
blur 0.5). ``get_recipe(views="dino")``, or ``load_recipe("pqcl_vit_small").derive(
crops=DINO_VIEWS)``, gives DINO's asymmetric views instead: blur 1.0 / 0.1 and solarization
0 / 0.2 on the two global crops, and local crops flipped like the global ones.

Queries use flip-correct geometry (``flip_correct=True``): the official code records the global
crops' boxes before their horizontal flip and ignores it, so half of its queries point at the
mirrored place; ``queries=dict(flip_correct=False)`` reproduces that (it needs unflipped local
crops, as the official views have).
"""

from keras_pqcl.recipe import Recipe

#: ``MultiCropConfig`` fields of the official PQCL views: one global transform for both
#: global crops (a single blur and solarization probability applies to every global crop),
#: local crops never flipped. Jitter, grayscale, local blur and flip_p are the defaults
#: (0.8, 0.2, 0.5, 0.5), the same in both pipelines.
OFFICIAL_VIEWS = dict(global_blur_p=1.0, solarize_p=0.0, flip_local=False)
#: DINO's asymmetric views (the ``MultiCropConfig`` defaults): global crop 1 always blurred,
#: global crop 2 blurred with p 0.1 and solarized with p 0.2, local crops flipped.
DINO_VIEWS = dict(global_blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2), flip_local=True)
VIEWS = {"official": OFFICIAL_VIEWS, "dino": DINO_VIEWS}


def get_recipe(views="official"):
    """The recipe; ``views`` is ``"official"`` (the PQCL code's views) or ``"dino"``."""
    if views not in VIEWS:
        raise ValueError(f"views must be one of {sorted(VIEWS)}, got {views!r}.")
    return Recipe(
        name="pqcl_vit_small",
        description="iBOT+PQCL ViT-S/16, 100 epochs, 2x224 + 1x96 query crop, masks (README run; bring --data)",
        method="pqcl",
        backbone="vit_small",
        patch_size=16,
        drop_path_rate=0.1,
        pos_embed="sincos",
        method_args=dict(
            base="ibot",
            out_dim=8192,
            norm_last_layer=False,
            teacher_temp=0.07,
            teacher_patch_temp=0.07,
            teacher_query_temp=0.07,
            warmup_teacher_temp_epochs=30,
            lambda1=1.0,
            lambda2=1.0,
            lambda3=1.0,
        ),
        crops=dict(
            global_size=224,
            local_size=96,
            n_local=1,
            global_scale=(0.25, 1.0),
            local_scale=(0.05, 0.25),
            **VIEWS[views],
        ),
        masks=dict(ratio=(0.0, 0.3), ratio_var=(0.0, 0.2), shape="block"),
        queries=dict(flip_correct=True),
        batch_size=512,
        epochs=100,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
