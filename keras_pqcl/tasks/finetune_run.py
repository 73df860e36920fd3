"""One segmentation fine-tuning run into a folder: what ``keras-pqcl finetune segment`` does.

Writes ``log.csv`` (per-epoch loss and metrics), ``segmenter.keras`` (the fine-tuned model),
``summary.json`` (settings and final validation scores) and ``predictions.png`` (rows of
image | ground truth | prediction on validation images).
"""

import json
import os
import time

import numpy as np

# One colour per class id (a fixed random palette, background black); 255 = ignore is white.
_PALETTE = np.random.default_rng(0).integers(40, 256, (256, 3)).astype(np.uint8)
_PALETTE[0] = 0
_PALETTE[255] = 255


def colorize(mask):
    """Class ids ``(H, W)`` -> RGB uint8 ``(H, W, 3)``."""
    return _PALETTE[np.asarray(mask).astype(np.int64) % 256]


def save_predictions_png(path, images, masks, preds):
    """Rows of ``image | ground truth | prediction`` (uint8 images ``(N, H, W, 3)``)."""
    from PIL import Image

    rows = [np.concatenate([img, colorize(m), colorize(p)], axis=1) for img, m, p in zip(images, masks, preds)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def finetune_segmentation(
    backbone,
    train,
    val,
    num_classes,
    output,
    decoder="upernet",
    epochs=10,
    batch_size=8,
    lr=1e-4,
    layer_decay=0.65,
    weight_decay=0.05,
    warmup_epochs=1,
    crop_size=None,
    freeze_backbone=False,
    channels=256,
    seed=0,
    verbose=2,
    num_predictions=4,
):
    """Fine-tune ``backbone`` on ``train`` and score it on ``val``.

    Args:
        backbone: a keras_pqcl backbone.
        train, val: dicts with ``"images"`` uint8 ``(N, H, W, 3)`` and ``"masks"`` ``(N, H, W)``.
        num_classes: class count (255 = ignore is not one).
        output: folder for the artefacts (created).
        other arguments: :class:`~keras_pqcl.tasks.SemanticSegmenter`,
            :func:`~keras_pqcl.optimizers.finetune_adamw` and
            :func:`~keras_pqcl.tasks.data.segmentation_dataset`.

    Returns:
        the summary dict written to ``summary.json``.
    """
    import keras

    from keras_pqcl.optimizers import finetune_adamw
    from keras_pqcl.tasks import SemanticSegmenter
    from keras_pqcl.tasks.data import segmentation_dataset

    start = time.time()
    os.makedirs(output, exist_ok=True)
    crop = int(crop_size or train["images"].shape[1])
    train_ds = segmentation_dataset(
        train["images"],
        train["masks"],
        num_classes,
        batch_size=batch_size,
        crop_size=crop,
        seed=seed,
        names=train.get("names"),
    )
    val_ds = segmentation_dataset(
        val["images"], val["masks"], num_classes, batch_size=batch_size, training=False, names=val.get("names")
    )
    steps = len(train_ds)
    if steps == 0:
        raise ValueError(f"{len(train['images'])} training images make no batch of {batch_size}; lower --batch-size.")
    seg = SemanticSegmenter(backbone, num_classes, decoder=decoder, freeze_backbone=freeze_backbone, channels=channels)
    total = int(epochs) * steps
    seg.compile(
        optimizer=finetune_adamw(
            seg,
            lr=lr,
            layer_decay=layer_decay,
            weight_decay=weight_decay,
            warmup_steps=min(int(warmup_epochs) * steps, total - 1),
            total_steps=total,
        )
    )
    # The dataset reshuffles itself every epoch.
    seg.fit(
        train_ds,
        validation_data=val_ds,
        epochs=int(epochs),
        verbose=verbose,
        shuffle=False,
        callbacks=[keras.callbacks.CSVLogger(os.path.join(output, "log.csv"))],
    )
    scores = seg.evaluate(val_ds, verbose=0, return_dict=True)
    seg.save(os.path.join(output, "segmenter.keras"))

    shown = slice(0, min(num_predictions, len(val["images"])))
    normalised = next(iter(val_ds.unbatch().batch(shown.stop)))[0]
    preds = seg.segment(np.asarray(normalised))
    save_predictions_png(os.path.join(output, "predictions.png"), val["images"][shown], val["masks"][shown], preds)
    summary = {
        "backend": keras.backend.backend(),
        "decoder": decoder,
        "num_classes": int(num_classes),
        "epochs": int(epochs),
        "steps_per_epoch": steps,
        "batch_size": int(batch_size),
        "lr": float(lr),
        "channels": int(channels),
        "layer_decay": float(layer_decay),
        "weight_decay": float(weight_decay),
        "crop_size": crop,
        "freeze_backbone": bool(freeze_backbone),
        "num_train": len(train["images"]),
        "num_val": len(val["images"]),
        "val": {k: float(v) for k, v in scores.items()},
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
