"""MCL at CPU scale on the embedded synthetic_scenes: a ResNet with one bottleneck per stage
(width 16) + an FPN of 64 channels on 64 px views, 2x2 / 4x4 / 8x8 montages, batch 32 (31
in-batch negatives per level). At the method's temperature of 1 it learns slowly at this
scale (a few epochs move the loss by about 1 %); it is here to run MCL end to end offline."""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="tiny_mcl",
        description="MCL, ResNet (1 block/stage, width 16) + FPN 64 on synthetic_scenes, 64 px views, CPU minutes",
        method="mcl",
        backbone="resnet_tiny",
        drop_path_rate=0.0,
        method_args=dict(
            fpn_channels=64, neck_convs=2, neck_channels=64, hidden_dim=256, projection_dim=64, predictor_hidden_dim=256
        ),
        data="synthetic_scenes:1024",
        crops=dict(image_size=64, scale=(0.3, 1.0), blur_sigma=(0.1, 0.6)),
        batch_size=32,
        epochs=10,
        base_lr=2e-2,
        min_lr=1e-5,
        warmup_epochs=1,
        weight_decay=1e-5,
        weight_decay_end=1e-5,
        teacher_momentum=0.99,
        seed=0,
        knn_every=2,
    )
