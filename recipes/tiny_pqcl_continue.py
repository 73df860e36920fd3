"""``pqcl_continue_vit_small14`` at the ``tiny`` recipe's scale: continue a tiny ViT/14 with iBOT+PQCL.

The ``tiny_pqcl`` run (4-block ViT, embedded ``synthetic_scenes``) moved to the 14-pixel patch
grid of the DINOv2 backbones: 56 px global crops (4 x 4 patches, as tiny's 32 px crops of 8 px
patches) and two 28 px query crops (2 x 2 queries each), and a learned position table, which the
queries read at their places (``query_position_code="table"``), as DINOv2's learned table. Pass the backbone to
continue with ``--init-from`` (``init_from``): a ``.keras`` backbone of this architecture, e.g. the
``teacher_backbone.keras`` of a DINO run of the same backbone, as ``benchmarks/continue_knn.py``
makes one.

Optimisation as in the full-size recipe, and for the same reasons: the peak rate is a tenth of
the from-scratch one (``base_lr`` 2e-4 against tiny's 2e-3) so that the fresh head's gradients
do not undo the starting backbone, one warm-up epoch, a slower teacher (momentum 0.996 against
tiny's 0.99), and a short run (3 epochs, 192 steps) with the k-NN monitor every epoch.

Measured (``benchmarks/continue_knn.py``, JAX): a 10-epoch DINO start at 40.0 % k-NN top-1 ends
at 39.2 %, within the spread of the 500 test images. The head is still near uniform after these
192 steps (teacher entropy 6.65 of ln 1024 = 6.93); in an earlier run (sin-cos tables)
``tiny_pqcl``'s from-scratch rate did not hurt the start either and sharpened the head (5.92), so
raise ``base_lr`` or ``epochs`` for a head that learns more; the low rate is for backbones that
have more to lose.
"""

from keras_pqcl.recipe import load_recipe


def get_recipe():
    return load_recipe("tiny_pqcl").derive(
        name="tiny_pqcl_continue",
        description="iBOT+PQCL continuing a tiny ViT/14 (--init-from FILE) on synthetic_scenes, 56/28 px, lr 2e-4",
        patch_size=14,
        pos_embed="learned",
        method_args=dict(query_position_code="table"),
        crops=dict(global_size=56, local_size=28),
        epochs=3,
        base_lr=2e-4,
        warmup_epochs=1,
        teacher_momentum=0.996,
        knn_every=1,
    )
