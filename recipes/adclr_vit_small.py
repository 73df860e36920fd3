"""ADCLR ViT-S/16 on DINO (Zhang et al., ICLR 2023, arXiv 2306.13337; reconstructed).

Query crops (here the pipeline's local crops, 4 x 96 px at 0.05-0.4) are patch-embedded from
their pixels with the backbone's own patch embedding and their own interpolated position
table, appended to each global view with one-directional attention, and contrasted across
views (teacher's query outputs given view A vs the student's given view B). The paper does
not fix the crop count and size or the query-loss weight; these are the library's defaults,
with DINO's multi-crop CLS terms and optimisation (512 per step, 100 epochs). Pass your data
with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="adclr_vit_small",
        description="ADCLR (on DINO) ViT-S/16, 100 epochs, 2x224 + 4x96 query crops (reconstructed; bring --data)",
        method="adclr",
        backbone="vit_small",
        patch_size=16,
        drop_path_rate=0.1,
        method_args=dict(
            base="dino",
            out_dim=65536,
            norm_last_layer=True,
            teacher_temp=0.07,
            teacher_query_temp=0.07,
            warmup_teacher_temp_epochs=30,
            lambda3=1.0,
        ),
        crops=dict(global_size=224, local_size=96, n_local=4, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
        batch_size=512,
        epochs=100,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
