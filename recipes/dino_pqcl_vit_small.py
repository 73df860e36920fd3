"""DINO+PQCL ViT-S/16 (Zhang et al., ICML 2023; reconstructed).

The paper applies PQCL to DINO too, but only the iBOT+PQCL code was released. This follows the
code's structure with the DINO loss: unmasked global views, no MIM term, ``L = L_cls +
L_query``; the mask token exists only to build the queries. 2 x 224 (0.25-1) + 1 x 96
(0.05-0.25) crops as the PQCL run, 65536 prototypes in one head shared by CLS and queries,
no local-crop CLS terms (``local_cls_terms=True`` adds them), DINO's optimisation (512 per
step, 100 epochs). Pass your data with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="dino_pqcl_vit_small",
        description="DINO+PQCL ViT-S/16, 100 epochs, 2x224 + 1x96 query crop (reconstructed; bring --data)",
        method="dino_pqcl",
        backbone="vit_small",
        patch_size=16,
        drop_path_rate=0.1,
        pos_embed="sincos",
        method_args=dict(
            out_dim=65536,
            norm_last_layer=True,
            teacher_temp=0.07,
            teacher_query_temp=0.07,
            warmup_teacher_temp_epochs=30,
            lambda3=1.0,
            local_cls_terms=False,
        ),
        crops=dict(global_size=224, local_size=96, n_local=1, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25)),
        batch_size=512,
        epochs=100,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
