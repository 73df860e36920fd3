"""iBOT+PQCL at the ``tiny`` recipe's scale: embedded data, 4-block ViT/8 with sin-cos positions."""

from keras_pqcl.recipe import load_recipe


def get_recipe():
    tiny = load_recipe("tiny")
    # The extra teacher temperatures follow the CLS one, as in the paper recipes.
    warm, temp = tiny.method_args.get("warmup_teacher_temp", 0.04), tiny.method_args.get("teacher_temp", 0.07)
    return tiny.derive(
        name="tiny_pqcl",
        description="iBOT+PQCL, tiny ViT/8 on synthetic_scenes (embedded), 2 query crops, CPU minutes",
        method="pqcl",
        method_args=dict(
            warmup_teacher_patch_temp=warm,
            teacher_patch_temp=temp,
            warmup_teacher_query_temp=warm,
            teacher_query_temp=temp,
        ),
        crops=dict(n_local=2),
        masks=dict(ratio=(0.0, 0.3), ratio_var=(0.0, 0.2)),
    )
