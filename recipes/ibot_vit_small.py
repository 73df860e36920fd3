"""iBOT ViT-S/16, the paper's 800-epoch setting (Zhou et al., ICLR 2022; iBOT README).

16 GPUs x 64 = 1024 images per step, 2 x 224 (0.25-1) + 10 x 96 (0.05-0.25) crops, block masks
with ratio 0 or U(0.1, 0.5) per global crop, shared head with 8192 prototypes for CLS and
patches, norm_last_layer False, teacher temperatures 0.04 -> 0.07 over 30 epochs. Reported:
k-NN 75.2 / linear 77.9 on ImageNet. Pass your data with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="ibot_vit_small",
        description="iBOT ViT-S/16, 800 epochs, 2x224 + 10x96 crops, block masks (paper setting; bring --data)",
        method="ibot",
        backbone="vit_small",
        patch_size=16,
        drop_path_rate=0.1,
        method_args=dict(
            out_dim=8192,
            patch_out_dim=8192,
            shared_head=True,
            norm_last_layer=False,
            teacher_temp=0.07,
            teacher_patch_temp=0.07,
            warmup_teacher_temp_epochs=30,
        ),
        crops=dict(global_size=224, local_size=96, n_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25)),
        masks=dict(ratio=(0.0, 0.3), ratio_var=(0.0, 0.2), shape="block"),
        batch_size=1024,
        epochs=800,
        base_lr=5e-4,
        warmup_epochs=10,
        teacher_momentum=0.996,
    )
