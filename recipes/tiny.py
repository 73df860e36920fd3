"""The default recipe: DINO on the embedded ``synthetic_scenes`` data, minutes on a laptop CPU.

A 4-block ViT with 8-pixel patches on 32 px global and 16 px local crops of the procedurally
generated scenes that ship inside the package; no download. The loss falls visibly within
the first epochs. Use it to check an installation, or as a template for your own recipe.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="tiny",
        description="DINO, 4-block ViT/8 on synthetic_scenes (embedded), 32/16 px crops, CPU minutes",
        method="dino",
        backbone="vit_tiny",
        patch_size=8,
        drop_path_rate=0.0,
        backbone_args=dict(embed_dim=96, depth=4, num_heads=3),
        method_args=dict(
            out_dim=1024,
            hidden_dim=256,
            bottleneck_dim=64,
            warmup_teacher_temp=0.04,
            teacher_temp=0.04,
            warmup_teacher_temp_epochs=0,
        ),
        data="synthetic_scenes:2048",
        crops=dict(global_size=32, local_size=16, n_local=4, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3)),
        batch_size=64,
        epochs=12,
        base_lr=2e-3,
        warmup_epochs=2,
        teacher_momentum=0.99,
        seed=0,
    )
