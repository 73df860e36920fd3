"""MCL ResNet-50 + FPN, the official code's ImageNet 100-epoch setting (Guo et al., 2023).

4096 images per step (32 GPUs x 128 with SyncBN in the reference), 8 views of 224 px per image,
2x2 / 4x4 / 8x8 montages for P4 / P3 / P2, temperature 1, level weights (1/2, 1/4, 1/8, 1/8),
target momentum 0.99 -> 1. The reference optimizer is LARS (lr 1.0 x batch/256, momentum 0.9,
weight decay 1e-5, none on biases and BN, 10 warm-up epochs, cosine to 1e-4, global-norm clip
500); keras_pqcl has no LARS yet, so this recipe runs the DINO AdamW with the same schedule
shape. Bring --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="mcl_resnet50",
        description="MCL ResNet-50 + FPN, 100 epochs, 8 x 224 px views, 2x2/4x4/8x8 montages (bring --data)",
        method="mcl",
        backbone="resnet50",
        drop_path_rate=0.0,
        method_args=dict(
            fpn=True,
            fpn_channels=256,
            neck_convs=4,
            neck_channels=256,
            hidden_dim=2048,
            projection_dim=256,
            predictor_hidden_dim=2048,
            temperature=1.0,
            level_weights=(0.5, 0.25, 0.125, 0.125),
        ),
        crops=dict(image_size=224, ratios=(2, 4, 8), uses=(1, 1, 2), scale=(0.2, 1.0)),
        batch_size=4096,
        epochs=100,
        base_lr=5e-4,
        min_lr=1e-6,
        warmup_epochs=10,
        weight_decay=1e-5,
        weight_decay_end=1e-5,
        teacher_momentum=0.99,
    )
