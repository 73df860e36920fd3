"""ADCLR (on DINO) at the ``tiny`` recipe's scale: embedded data, 4-block ViT/8."""

from keras_pqcl.recipe import load_recipe


def get_recipe():
    tiny = load_recipe("tiny")
    # The extra teacher temperatures follow the CLS one, as in the paper recipes.
    warm, temp = tiny.method_args.get("warmup_teacher_temp", 0.04), tiny.method_args.get("teacher_temp", 0.07)
    return tiny.derive(
        name="tiny_adclr",
        description="ADCLR on DINO, tiny ViT/8 on synthetic_scenes (embedded), CPU minutes",
        method="adclr",
        method_args=dict(warmup_teacher_query_temp=warm, teacher_query_temp=temp),
    )
