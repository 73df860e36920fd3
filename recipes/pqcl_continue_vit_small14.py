"""Continued pre-training: iBOT+PQCL on your images, starting from a ViT-S/14 backbone.

Pass the starting weights with ``--init-from FILE`` and your images with ``--data FOLDER``::

    keras-pqcl pretrain --recipe pqcl_continue_vit_small14 --data my_images/ \\
        --init-from runs/vits14/teacher_backbone.keras --output runs/vits14_cont

The file starts the student and the teacher backbone; the head (8192 prototypes, shared by CLS,
masked patches and queries), the optimizer and every schedule start fresh. The backbone is the
``vit_small14`` preset (DINOv2's ViT-S/14: patch 14, LayerScale) with a learned position table, as
DINOv2's, so the official DINOv2 weights start it as they are. The queries then carry that table,
read bilinearly at each query's place in the view (``query_position_code="table"``), instead of
PQCL's fixed sin-cos code, which matches only a sin-cos table; at a patch's place both give that
patch's own position code.

Views: the PQCL code's (one transform for both global crops, local crop never flipped), with the
sizes moved to the 14-pixel grid: 2 x 224 px global crops (16 x 16 patches) and one 98 px local
crop (7 x 7 = 49 query tokens per global view) instead of 96 px, which is no multiple of 14.

Optimisation, and why it differs from a run from scratch (``pqcl_vit_small``):

* ``base_lr`` 5e-5, a tenth of PQCL's 5e-4 (x batch / 256): the first updates come from a
  randomly initialised head, and at the from-scratch rate their gradients rewrite a backbone
  that is already good before the head has learned to read it.
* ``warmup_epochs`` 1 instead of 10: at a tenth of the rate a long ramp only spends the short
  run at rates too small to adapt anything; one epoch is enough for the fresh head's first,
  largest gradients to pass at tiny rates.
* ``teacher_momentum`` 0.998 (0.996 from scratch): the teacher is the backbone you keep, and
  it should follow the student only once the head's early noise has averaged out.
* Teacher temperatures 0.04 -> 0.07 over 5 epochs (30 from scratch), so the sharpening reaches
  its final value within the short run.
* 20 epochs, batch 256, stochastic depth 0.1, iBOT block masks, lambda1 = lambda2 = lambda3 = 1.

``tiny_pqcl_continue`` is the same recipe at CPU scale; ``benchmarks/continue_knn.py`` checks
with it that a short continued run keeps the starting backbone's k-NN accuracy.
"""

from keras_pqcl.recipe import load_recipe


def get_recipe():
    # pqcl_vit_small (official views, heads, masks, temperatures) with what continuing changes.
    return load_recipe("pqcl_vit_small").derive(
        name="pqcl_continue_vit_small14",
        description="iBOT+PQCL continuing a ViT-S/14 (--init-from FILE), lr 5e-5, 1 warm-up epoch, 2x224 + 1x98",
        backbone="vit_small14",
        patch_size=14,
        pos_embed="learned",
        method_args=dict(query_position_code="table", warmup_teacher_temp_epochs=5),
        crops=dict(local_size=98),
        batch_size=256,
        epochs=20,
        base_lr=5e-5,
        warmup_epochs=1,
        teacher_momentum=0.998,
    )
