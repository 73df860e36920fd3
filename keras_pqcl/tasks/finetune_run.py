"""One segmentation fine-tuning run into a folder: what ``keras-pqcl finetune segment`` does.

Writes ``log.csv`` (per-epoch loss and metrics, validation included), ``loss.png``,
``checkpoints/`` (the whole segmenter with its optimizer after every epoch),
``segmenter.keras`` (the fine-tuned model), ``summary.json`` (settings and final validation
scores) and ``predictions.png`` (rows of image | ground truth | prediction on validation
images). The folder, the checkpoints, the log and the plot are pre-training's own
(:class:`~keras_pqcl.run_folder.RunFolder`, :class:`~keras_pqcl.callbacks.Checkpoint`,
:class:`~keras_pqcl.callbacks.EpochLog`, :func:`~keras_pqcl.plots.plot_log`), so a
fine-tuning run is locked, refused, resumed and cut back after a crash the same way.
"""

import json
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


#: Settings a resumed run must share with the checkpoint: they shaped its weights, its data
#: stream or its learning-rate schedule.
RESUME_SETTINGS = (
    "decoder",
    "num_classes",
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "lr",
    "channels",
    "layer_decay",
    "weight_decay",
    "warmup_epochs",
    "crop_size",
    "freeze_backbone",
    "seed",
    "num_train",
)


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
    resume=False,
    overwrite=False,
    keep_checkpoints=2,
):
    """Fine-tune ``backbone`` on ``train`` and score it on ``val``.

    A checkpoint is written after every epoch. ``resume=True`` continues the run in
    ``output`` from its newest checkpoint that loads (``backbone`` is then not used: the
    checkpoint holds the segmenter) and ends with the weights an uninterrupted run would
    have: every epoch's batches depend on (``seed``, epoch) alone, and the checkpoint holds
    the optimizer step and the dropout generators. A folder that holds another run is
    refused unless ``resume`` or ``overwrite`` is set.

    Args:
        backbone: a keras_pqcl backbone.
        train, val: dicts with ``"images"`` uint8 ``(N, H, W, 3)`` and ``"masks"`` ``(N, H, W)``.
        num_classes: class count (255 = ignore is not one).
        output: folder for the artefacts (created).
        resume: continue the run in ``output`` (it must hold a checkpoint).
        overwrite: delete the run in ``output`` first.
        keep_checkpoints: newest checkpoints kept.
        other arguments: :class:`~keras_pqcl.tasks.SemanticSegmenter`,
            :func:`~keras_pqcl.optimizers.finetune_adamw` and
            :func:`~keras_pqcl.tasks.data.segmentation_dataset`.

    Returns:
        the summary dict written to ``summary.json``.
    """
    from keras_pqcl.run_folder import RunFolder

    options = dict(
        decoder=decoder,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        layer_decay=layer_decay,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        crop_size=crop_size,
        freeze_backbone=freeze_backbone,
        channels=channels,
        seed=seed,
        verbose=verbose,
        num_predictions=num_predictions,
        keep_checkpoints=keep_checkpoints,
    )
    with RunFolder(output, resume=resume, overwrite=overwrite) as folder:
        return _finetune(folder, backbone, train, val, num_classes, resume, options)


def _finetune(folder, backbone, train, val, num_classes, resume, options):
    import keras

    from keras_pqcl.callbacks import Checkpoint, EpochLog, NaNGuard, load_latest_checkpoint
    from keras_pqcl.io.files import atomic_write, atomic_write_text
    from keras_pqcl.optimizers import finetune_adamw
    from keras_pqcl.tasks import SemanticSegmenter
    from keras_pqcl.tasks.data import check_masks, segmentation_dataset
    from keras_pqcl.callbacks.epoch_log import read_log
    from keras_pqcl.plots import plot_log

    start = time.time()
    epochs, batch_size, seed = int(options["epochs"]), int(options["batch_size"]), int(options["seed"])
    decoder = options["decoder"]
    crop = int(options["crop_size"] or train["images"].shape[1])
    check_masks(train["images"], train["masks"], num_classes, names=train.get("names"))
    steps = len(train["images"]) // batch_size
    if steps == 0:
        raise ValueError(f"{len(train['images'])} training images make no batch of {batch_size}; lower --batch-size.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}.")
    settings = {
        "backend": keras.backend.backend(),
        "decoder": decoder,
        "num_classes": int(num_classes),
        "epochs": epochs,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "lr": float(options["lr"]),
        "channels": int(options["channels"]),
        "layer_decay": float(options["layer_decay"]),
        "weight_decay": float(options["weight_decay"]),
        "warmup_epochs": int(options["warmup_epochs"]),
        "crop_size": crop,
        "freeze_backbone": bool(options["freeze_backbone"]),
        "seed": seed,
        "num_train": len(train["images"]),
        "num_val": len(val["images"]),
    }
    ckpt_dir = folder.join("checkpoints")
    seg, progress = None, None
    if resume:
        seg, progress = load_latest_checkpoint(ckpt_dir, kind=SemanticSegmenter)
        if seg is None:
            raise ValueError(
                f"--resume: {folder.shown!r} holds no checkpoint to continue (no {ckpt_dir}); drop --resume "
                "to start a new run."
            )
        _check_resume(progress, settings)
        print(f"keras-pqcl: resuming from {progress.path} {progress.describe()}.")
    else:
        keras.utils.set_random_seed(seed)
        seg = SemanticSegmenter(
            backbone,
            num_classes,
            decoder=decoder,
            freeze_backbone=settings["freeze_backbone"],
            channels=settings["channels"],
        )
        total = epochs * steps
        seg.compile(
            optimizer=finetune_adamw(
                seg,
                lr=settings["lr"],
                layer_decay=settings["layer_decay"],
                weight_decay=settings["weight_decay"],
                warmup_steps=min(settings["warmup_epochs"] * steps, total - 1),
                total_steps=total,
            )
        )
    done = progress.epoch if progress is not None else 0
    val_ds = segmentation_dataset(
        val["images"], val["masks"], num_classes, batch_size=batch_size, training=False, names=val.get("names")
    )
    csv_path = folder.join("log.csv")
    checkpoint = Checkpoint(
        ckpt_dir,
        keep=options["keep_checkpoints"],
        epochs=epochs,
        resume_from=progress,
        metadata={"finetune": settings},
        steps_per_epoch=steps,
    )
    if done < epochs:
        train_ds = segmentation_dataset(
            train["images"],
            train["masks"],
            num_classes,
            batch_size=batch_size,
            crop_size=crop,
            seed=seed,
            names=train.get("names"),
            epochs=epochs,
            start_epoch=done,
        )
        seg.fit(
            train_ds,
            validation_data=val_ds,
            epochs=epochs,
            initial_epoch=done,
            steps_per_epoch=steps,
            verbose=options["verbose"],
            shuffle=False,  # the stream is already in its (seed, epoch) order
            callbacks=[
                NaNGuard(ckpt_dir),
                EpochLog(csv_path, start_epoch=done, validation=True),
                # Last: an epoch's checkpoint follows its log row (see pretraining).
                checkpoint,
            ],
        )
    else:
        print(f"keras-pqcl: the checkpoint holds all {epochs} epochs; writing the run's final files.")
    scores = seg.evaluate(val_ds, verbose=0, return_dict=True)
    atomic_write(folder.join("segmenter.keras"), seg.save)

    shown = min(int(options["num_predictions"]), len(val["images"]))
    normalised = next(iter(val_ds.unbatch().batch(shown)))[0]
    preds = seg.segment(np.asarray(normalised))
    save_predictions_png(folder.join("predictions.png"), val["images"][:shown], val["masks"][:shown], preds)
    plot = plot_log(read_log(csv_path), folder.join("loss.png"), terms=("val_loss",))
    summary = dict(
        settings,
        val={k: float(v) for k, v in scores.items()},
        resumed_from=progress.path if progress is not None else None,
        checkpoint=checkpoint.last_path,
        log=csv_path,
        plot=plot,
        seconds=round(time.time() - start, 1),
    )
    atomic_write_text(folder.join("summary.json"), json.dumps(summary, indent=2))
    return summary


def _check_resume(progress, settings):
    """One ValueError naming every setting that differs from the checkpoint's run."""
    previous = progress.metadata.get("finetune")
    if previous is None:
        raise ValueError(f"{progress.path} was not written by a fine-tuning run; pass another --output.")
    changed = [
        f"{key} (was {previous[key]!r}, now {settings[key]!r})"
        for key in RESUME_SETTINGS
        if key in previous and previous[key] != settings[key]
    ]
    if changed:
        raise ValueError(
            "--resume cannot change " + "; ".join(changed) + f": {progress.path} was trained with the old value. "
            "Drop the change, or start a new run with another --output."
        )
