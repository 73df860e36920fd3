"""DenseCL ResNet-50, the paper's ImageNet 200-epoch setting (Wang et al., CVPR 2021).

256 images per step (8 GPUs x 32 in the paper), two MoCo-v2 views of 224 px, torch-style SGD
(lr 0.03 x batch/256, momentum 0.9, weight decay 1e-4 through the gradient) cosine to 0 without
warm-up, key-encoder momentum 0.999 held constant, two 65,536-entry queues, temperature 0.2,
lambda 0.5. Split BatchNorm in 8 groups of 32 with the key permutation stands in for shuffle BN
(see :class:`keras_pqcl.models.DenseCL`). Transfer the *student* (query) backbone. The COCO
setting is 800 epochs with base_lr 0.3; do not use 0.3 on ImageNet. Pass your data with --data.
"""

from keras_pqcl.recipe import Recipe


def get_recipe():
    return Recipe(
        name="densecl_resnet50",
        description="DenseCL ResNet-50, 200 epochs, 2x224 MoCo-v2 views (paper ImageNet setting; bring --data)",
        method="densecl",
        backbone="resnet50",
        patch_size=32,  # the ResNet's output stride: crops must be multiples of it
        drop_path_rate=0.0,
        backbone_args=dict(bn_splits=8),
        method_args=dict(hidden_dim=2048, projection_dim=128, queue_size=65536, temperature=0.2, loss_lambda=0.5),
        crops=dict(
            global_size=224,
            n_global=2,
            n_local=0,
            global_scale=(0.2, 1.0),
            color_jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
            global_blur_p=(0.5, 0.5),
            blur_sigma=(0.1, 2.0),
            solarize_p=(0.0, 0.0),
        ),
        batch_size=256,
        epochs=200,
        base_lr=0.03,
        min_lr=0.0,
        warmup_epochs=0,
        weight_decay=1e-4,
        weight_decay_end=1e-4,
        clip_grad=0.0,
        teacher_momentum=0.999,
    )
