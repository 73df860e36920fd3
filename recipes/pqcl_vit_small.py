"""iBOT+PQCL ViT-S/16, the PQCL README run (Zhang et al., ICML 2023; github.com/Sherrylone/PQCL).

8 GPUs x 64 = 512 images per step, 100 epochs, ViT-S/16 with the fixed sin-cos position table
(``pos_small``), 2 x 224 (0.25-1) global crops and ONE 96 px local crop (0.05-0.25) whose 36
patches become the query tokens of each global view; iBOT block masks; one shared head with
8192 prototypes; teacher temperatures (CLS, patch, query) 0.04 -> 0.07 over 30 epochs;
lambda1 = lambda2 = lambda3 = 1. Queries use flip-correct geometry (the official code ignores
flips; ``queries=dict(flip_correct=False)`` reproduces it). Pass your data with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
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
        crops=dict(global_size=224, local_size=96, n_local=1, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25)),
        masks=dict(ratio=(0.0, 0.3), ratio_var=(0.0, 0.2), shape="block"),
        queries=dict(flip_correct=True),
        batch_size=512,
        epochs=100,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
