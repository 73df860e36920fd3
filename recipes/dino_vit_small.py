"""DINO ViT-S/16, the paper's 100-epoch setting (Caron et al. 2021, README "vanilla" run).

8 GPUs x 64 = 512 images per step, 2 x 224 + 8 x 96 crops, teacher temperature 0.04 ->
0.07 over 30 epochs, k-NN 69.3 / linear 74.0 on ImageNet. Pass your data with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="dino_vit_small",
        description="DINO ViT-S/16, 100 epochs, 2x224 + 8x96 crops (paper setting; bring --data)",
        method="dino",
        backbone="vit_small",
        patch_size=16,
        drop_path_rate=0.1,
        method_args=dict(out_dim=65536, norm_last_layer=True, teacher_temp=0.07, warmup_teacher_temp_epochs=30),
        crops=dict(global_size=224, local_size=96, n_local=8, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)),
        batch_size=512,
        epochs=100,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
