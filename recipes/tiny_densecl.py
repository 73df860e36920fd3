"""DenseCL at CPU scale on the embedded synthetic_scenes.

A ResNet with one bottleneck block per stage (width 16) on 64 px MoCo-v2 views: C5 is 2 x 2,
so the dense term has 4 positions per view. The queue (512) is smaller than the data (1024
images), so an image's own stale keys rarely sit among its negatives; key momentum 0.99
because 160 steps would barely move 0.999; blur sigma scaled to the image size.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="tiny_densecl",
        description="DenseCL, tiny ResNet (1 block/stage, width 16) on synthetic_scenes, 64 px views, CPU minutes",
        method="densecl",
        backbone="resnet_tiny",
        patch_size=32,
        drop_path_rate=0.0,
        backbone_args=dict(bn_splits=4),
        method_args=dict(hidden_dim=512, projection_dim=128, queue_size=512),
        data="synthetic_scenes:1024",
        crops=dict(
            global_size=64,
            local_size=32,
            n_global=2,
            n_local=0,
            global_scale=(0.2, 1.0),
            color_jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
            global_blur_p=(0.5, 0.5),
            blur_sigma=(0.1, 0.6),
            solarize_p=(0.0, 0.0),
        ),
        batch_size=64,
        epochs=10,
        base_lr=0.12,  # x 64/256 = 0.03, the paper's rate
        min_lr=0.0,
        warmup_epochs=0,
        weight_decay=1e-4,
        weight_decay_end=1e-4,
        clip_grad=0.0,
        teacher_momentum=0.99,
        seed=0,
        knn_every=2,
    )
