"""Run a recipe end to end: data, model, optimizer, callbacks, ``fit``, artefacts.

Used by ``keras-pqcl pretrain``; importable for scripts and notebooks::

    from keras_pqcl.recipe import load_recipe
    from keras_pqcl.training import pretrain
    pretrain(load_recipe("tiny"), "runs/tiny")
"""

import contextlib
import csv
import json
import os
import time

import keras

from keras_pqcl import backbones, callbacks, models, optimizers
from keras_pqcl.callbacks.checkpoint import _atomic_write, atomic_write_text


def build_dino(recipe, backbone):
    return models.DINO(backbone, teacher_momentum=recipe.teacher_momentum, **recipe.method_args)


#: method name -> function(recipe, backbone) returning an uncompiled model.
METHODS = {"dino": build_dino}


def build_backbone(recipe, image_size):
    return backbones.vit(
        recipe.backbone,
        patch_size=recipe.patch_size,
        image_size=image_size,
        drop_path_rate=recipe.drop_path_rate,
        pos_embed=recipe.pos_embed,
        **recipe.backbone_args,
    )


def build_model(recipe, steps_per_epoch, crops):
    if recipe.method not in METHODS:
        raise ValueError(f"Unknown method {recipe.method!r}; available: {sorted(METHODS)}.")
    backbone = build_backbone(recipe, crops.global_size)
    model = METHODS[recipe.method](recipe, backbone)
    optimizer = optimizers.dino_adamw(
        recipe.batch_size,
        recipe.epochs,
        steps_per_epoch,
        base_lr=recipe.base_lr,
        min_lr=recipe.min_lr,
        warmup_epochs=recipe.warmup_epochs,
        weight_decay=recipe.weight_decay,
        weight_decay_end=recipe.weight_decay_end,
        clip_per_tensor=recipe.clip_grad,
    )
    model.compile(optimizer=optimizer, jit_compile=recipe.jit_compile)
    return model


def distribution_scope():
    """Spread the batch over every local accelerator: MirroredStrategy (TF), DataParallel (JAX).

    Returns a context manager under which the model must be created.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if len(jax.devices()) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel())
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy().scope()
    return contextlib.nullcontext()


def pretrain(recipe, output_dir, resume=False, verbose=1):
    """Pre-train with ``recipe``, writing everything to ``output_dir``.

    ``output_dir`` receives ``teacher_backbone.keras`` and ``student_backbone.keras`` (load
    them with ``keras.saving.load_model`` after ``import keras_pqcl``), ``log.csv``,
    ``tensorboard/``, ``checkpoints/`` (resume with ``resume=True``), ``recipe.json`` and
    ``loss.png``.

    Returns:
        dict summary (epochs, steps, images/s, first and last loss, paths).
    """
    from keras_pqcl import data as kdata

    if recipe.precision not in ("float32", "mixed_bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'mixed_bfloat16', got {recipe.precision!r}.")
    keras.mixed_precision.set_dtype_policy(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoints")

    crops = kdata.MultiCropConfig(**recipe.crops)
    crops.check_patch_size(recipe.patch_size)
    dataset, info = kdata.pretrain_dataset(
        recipe.data, crops=crops, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed,
        return_info=True,
    )
    steps = kdata.steps_per_epoch(dataset)
    if steps is None and info.num_examples:
        # Folders drop undecodable files on the fly, so the length is only known up to them;
        # repeating keeps every epoch exactly `steps` batches long.
        steps = info.num_examples // recipe.batch_size
        dataset = dataset.repeat()
    if recipe.steps_per_epoch:
        steps = min(steps or recipe.steps_per_epoch, recipe.steps_per_epoch)
    if not steps:
        raise ValueError(f"Cannot tell how many batches {recipe.data!r} holds; set steps_per_epoch in the recipe.")
    if kdata.steps_per_epoch(dataset) != steps:
        dataset = dataset.take(steps)
    atomic_write_text(os.path.join(output_dir, "recipe.json"), recipe.to_json())

    initial_epoch = 0
    with distribution_scope():
        model = None
        if resume:
            model, initial_epoch = callbacks.load_checkpoint(ckpt_dir)
            if model is None and verbose:
                print(f"No checkpoint in {ckpt_dir}; starting from scratch.")
            elif verbose:
                print(f"Resuming from {ckpt_dir} after epoch {initial_epoch}.")
        if model is None:
            model = build_model(recipe, steps, crops)

    csv_path = os.path.join(output_dir, "log.csv")
    cbs = [
        callbacks.TeacherEMA(recipe.teacher_momentum, 1.0),
        callbacks.NaNGuard(),
        callbacks.Checkpoint(ckpt_dir, every=recipe.checkpoint_every),
        keras.callbacks.CSVLogger(csv_path, append=initial_epoch > 0),
        keras.callbacks.TensorBoard(os.path.join(output_dir, "tensorboard"), write_graph=False),
    ]
    start = time.time()
    if initial_epoch < recipe.epochs:
        model.fit(dataset, epochs=recipe.epochs, initial_epoch=initial_epoch, callbacks=cbs, verbose=verbose)
    seconds = time.time() - start

    paths = {}
    for role in ("teacher", "student"):
        path = os.path.join(output_dir, f"{role}_backbone.keras")
        backbone = getattr(model, f"{role}_backbone")
        _atomic_write(path, backbone.save)
        paths[role] = path
    history = read_log(csv_path)
    plot_path = plot_log(history, os.path.join(output_dir, "loss.png"))
    trained_epochs = recipe.epochs - initial_epoch
    summary = {
        "recipe": recipe.name,
        "backend": keras.backend.backend(),
        "epochs": recipe.epochs,
        "steps_per_epoch": steps,
        "seconds": round(seconds, 1),
        "images_per_second": round(trained_epochs * steps * recipe.batch_size / max(seconds, 1e-9), 2),
        "first_loss": history["loss"][0] if history.get("loss") else None,
        "last_loss": history["loss"][-1] if history.get("loss") else None,
        "teacher_backbone": paths["teacher"],
        "student_backbone": paths["student"],
        "log": csv_path,
        "plot": plot_path,
    }
    atomic_write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


def read_log(csv_path):
    """``{column: [float per epoch]}`` from a ``CSVLogger`` file."""
    if not os.path.exists(csv_path):
        return {}
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    columns = {}
    for row in rows:
        for key, value in row.items():
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                pass
    return columns


def plot_log(history, path):
    """Loss (and teacher entropy, when logged) per epoch as a PNG; returns the path or None."""
    if not history.get("loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(e) + 1 for e in history.get("epoch", range(len(history["loss"])))]
    panels = [k for k in ("loss", "teacher_entropy", "learning_rate", "teacher_temp") if k in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, history[key], marker="o", markersize=3)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
