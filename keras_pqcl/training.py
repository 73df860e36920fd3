"""Run a recipe end to end: data, model, optimizer, callbacks, ``fit``, artefacts.

Used by ``keras-pqcl pretrain``; importable for scripts and notebooks::

    from keras_pqcl.recipe import load_recipe
    from keras_pqcl.training import pretrain
    pretrain(load_recipe("tiny"), "runs/tiny")
"""

import contextlib
import csv
import dataclasses
import json
import os
import time
from typing import Callable

import keras

from keras_pqcl import backbones, callbacks, models, optimizers
from keras_pqcl.callbacks.checkpoint import _atomic_write, atomic_write_text


@dataclasses.dataclass(frozen=True)
class Method:
    """How the runner builds one pre-training method.

    Attributes:
        model: ``(recipe, backbone, **method_args) -> model`` (uncompiled).
        backbone_args: ``recipe -> dict`` of backbone arguments the method needs
            (a mask token, the sin-cos table); the recipe's ``pos_embed`` wins when it is set.
        dataset_args: ``recipe -> dict`` of extra :func:`keras_pqcl.data.pretrain_dataset`
            arguments (iBOT ``masks``, PQCL ``queries``).
        optimizer: ``(recipe, steps_per_epoch) -> optimizer`` (the DINO AdamW by default; the
            contrastive ResNet methods use torch-style SGD).
        dataset: ``recipe -> (dataset, info, image_size)``; the default builds multi-crop
            batches from ``recipe.crops`` with :func:`keras_pqcl.data.pretrain_dataset`.
        transfer: the network to evaluate and fine-tune: ``"teacher"`` (the EMA network of
            the self-distillation methods and MCL) or ``"student"`` (DenseCL's query encoder).
    """

    model: Callable
    backbone_args: Callable = lambda recipe: {}
    dataset_args: Callable = lambda recipe: {}
    optimizer: Callable = None
    dataset: Callable = None
    transfer: str = "teacher"


def _adamw(recipe, steps_per_epoch):
    return optimizers.dino_adamw(
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


def _multicrop_dataset(recipe):
    """The DINO-family multi-crop batches (plus the method's masks and queries)."""
    from keras_pqcl import data as kdata

    crops = kdata.MultiCropConfig(**recipe.crops)
    crops.check_patch_size(recipe.patch_size)
    dataset, info = kdata.pretrain_dataset(
        recipe.data, crops=crops, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed,
        return_info=True, **method_of(recipe).dataset_args(recipe),
    )
    return dataset, info, crops.global_size


def _montage_dataset(recipe):
    """MCL's batches: eight views per image and their montages (``recipe.crops`` holds the
    :class:`~keras_pqcl.data.MontageConfig` arguments)."""
    from keras_pqcl.data import montage

    config = montage.MontageConfig(**recipe.crops)
    dataset, info = montage.mcl_dataset(
        recipe.data, config, batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed, return_info=True,
    )
    return dataset, info, config.image_size


def _sgd(recipe, steps_per_epoch):
    return optimizers.moco_sgd(
        recipe.batch_size,
        recipe.epochs,
        steps_per_epoch,
        base_lr=recipe.base_lr,
        min_lr=recipe.min_lr,
        warmup_epochs=recipe.warmup_epochs,
        weight_decay=recipe.weight_decay,
    )


def _base(recipe, default="ibot"):
    return recipe.method_args.get("base", default)


def _masks(recipe):
    from keras_pqcl.data import MaskConfig

    return MaskConfig(patch_size=recipe.patch_size, **recipe.masks)


def _queries(recipe):
    from keras_pqcl.data import QueryConfig

    return QueryConfig(patch_size=recipe.patch_size, **recipe.queries)


def _pqcl_data(recipe):
    args = {"queries": _queries(recipe)}
    if _base(recipe) == "ibot":
        args["masks"] = _masks(recipe)
    return args


def _adclr_data(recipe):
    args = {}
    if recipe.method_args.get("query_position", "crop") == "global":
        args["queries"] = _queries(recipe)
    if _base(recipe, "dino") == "ibot":
        args["masks"] = _masks(recipe)
    return args


def _model(name, **fixed):
    def build(recipe, backbone):
        return getattr(models, name)(
            backbone, teacher_momentum=recipe.teacher_momentum, **{**fixed, **recipe.method_args}
        )

    return build


#: method name -> :class:`Method`. ``dino_pqcl`` is ``pqcl`` with ``base="dino"``.
METHODS = {
    "dino": Method(_model("DINO"), backbone_args=lambda recipe: {"pos_embed": "learned"}),
    "ibot": Method(
        _model("IBOT"),
        backbone_args=lambda recipe: {"use_mask_token": True, "pos_embed": "learned"},
        dataset_args=lambda recipe: {"masks": _masks(recipe)},
    ),
    "pqcl": Method(
        _model("PQCL"),
        backbone_args=lambda recipe: {"use_mask_token": True, "pos_embed": "sincos"},
        dataset_args=_pqcl_data,
    ),
    "dino_pqcl": Method(
        _model("PQCL", base="dino"),
        backbone_args=lambda recipe: {"use_mask_token": True, "pos_embed": "sincos"},
        dataset_args=lambda recipe: {"queries": _queries(recipe)},
    ),
    "adclr": Method(
        _model("ADCLR"),
        backbone_args=lambda recipe: {
            # The IBOT base class expects a mask token even where only base="ibot" uses it.
            "use_mask_token": True,
            "pos_embed": "sincos" if recipe.method_args.get("query_position") == "global" else "learned",
        },
        dataset_args=_adclr_data,
    ),
    "densecl": Method(_model("DenseCL"), optimizer=_sgd, transfer="student"),
    "mcl": Method(_model("MCL"), dataset=_montage_dataset),
}


def method_of(recipe):
    if recipe.method not in METHODS:
        raise ValueError(f"Unknown method {recipe.method!r}; available: {sorted(METHODS)}.")
    return METHODS[recipe.method]


def build_backbone(recipe, image_size):
    """The student backbone of ``recipe`` for ``image_size`` global crops (random init)."""
    if recipe.backbone in backbones.RESNET_PRESETS:
        # Convolutional: no patches, position table or stochastic depth; any input size.
        return backbones.resnet(recipe.backbone, **recipe.backbone_args)
    args = dict(method_of(recipe).backbone_args(recipe))
    if recipe.pos_embed is not None:
        args["pos_embed"] = recipe.pos_embed
    args.update(recipe.backbone_args)
    return backbones.vit(
        recipe.backbone,
        patch_size=recipe.patch_size,
        image_size=image_size,
        drop_path_rate=recipe.drop_path_rate,
        **args,
    )


def build_dataset(recipe):
    """``(dataset, info, image_size)``: the method's batches of ``recipe.data`` (uncapped)."""
    return (method_of(recipe).dataset or _multicrop_dataset)(recipe)


def build_optimizer(recipe, steps_per_epoch):
    """The method's optimizer with the recipe's schedule over ``epochs x steps_per_epoch``."""
    return (method_of(recipe).optimizer or _adamw)(recipe, steps_per_epoch)


def build_model(recipe, steps_per_epoch, image_size):
    model = method_of(recipe).model(recipe, build_backbone(recipe, image_size))
    model.compile(optimizer=build_optimizer(recipe, steps_per_epoch), jit_compile=recipe.jit_compile)
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
        dict summary (epochs, steps, images/s, first and last loss, last k-NN top-1, collapse
        message, paths; ``transfer_backbone`` is the one to evaluate and fine-tune).
    """
    from keras_pqcl import data as kdata

    if recipe.precision not in ("float32", "mixed_bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'mixed_bfloat16', got {recipe.precision!r}.")
    keras.mixed_precision.set_dtype_policy(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    os.makedirs(output_dir, exist_ok=True)
    ckpt_dir = os.path.join(output_dir, "checkpoints")

    dataset, info, image_size = build_dataset(recipe)
    knn = knn_monitor(recipe, image_size)
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
            model = build_model(recipe, steps, image_size)

    csv_path = os.path.join(output_dir, "log.csv")
    collapse = callbacks.CollapseGuard(stop=recipe.stop_on_collapse)
    cbs = [
        callbacks.TeacherEMA(recipe.teacher_momentum, 1.0),
        callbacks.NaNGuard(),
        collapse,
        callbacks.Checkpoint(ckpt_dir, every=recipe.checkpoint_every),
        # Before the logger, which only sees what earlier callbacks wrote into the logs.
        *([knn] if knn else []),
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
        "transfer_backbone": paths[method_of(recipe).transfer],
        "log": csv_path,
        "plot": plot_path,
        "collapse": collapse.message,
        "knn_top1": knn.history[-1][1] if knn and knn.history else None,
    }
    atomic_write_text(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary


#: held-out images per split of the k-NN monitor on ``synthetic_scenes`` (bank, queries).
KNN_SYNTHETIC_IMAGES = (1000, 500)


def knn_monitor(recipe, image_size):
    """The :class:`~keras_pqcl.callbacks.KNNMonitor` a recipe asks for, or None (``knn_every=0``).
    It scores the method's transfer network (see :class:`Method`)."""
    if not recipe.knn_every:
        return None
    if recipe.knn_data:
        splits = [os.path.join(recipe.knn_data, split) for split in ("train", "val")]
        missing = [path for path in splits if not os.path.isdir(path)]
        if missing:
            raise ValueError(
                f"knn_data={recipe.knn_data!r} needs train/ and val/ sub-folders of class folders; "
                f"missing: {', '.join(missing)}."
            )
        train, test = splits
    elif recipe.data.startswith("synthetic_scenes"):
        from keras_pqcl.data.sources import _parse_synthetic
        from keras_pqcl.data.synthetic import synthetic_scenes

        _, size = _parse_synthetic(recipe.data)
        splits = [synthetic_scenes(n, image_size=size, seed=seed) for n, seed in zip(KNN_SYNTHETIC_IMAGES, (1, 2))]
        train, test = ((split["images"], split["labels"]) for split in splits)
    else:
        raise ValueError(
            f"knn_every={recipe.knn_every} needs labelled held-out images: set knn_data to a folder with "
            f"train/ and val/ sub-folders of class folders (the data {recipe.data!r} has no held-out split)."
        )
    return callbacks.KNNMonitor(
        train, test, every=recipe.knn_every, image_size=image_size, use=method_of(recipe).transfer
    )


def read_log(csv_path):
    """``{column: [float per epoch]}`` from a ``CSVLogger`` file; ``NA`` cells (a k-NN column
    on epochs it was not evaluated) are NaN, so every column has one value per epoch."""
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
                if value in ("NA", "", None):
                    columns.setdefault(key, []).append(float("nan"))
    return columns


def plot_log(history, path):
    """Loss and its terms, teacher entropy, query agreement and schedules per epoch as a PNG.

    Returns the path, or None when the log holds no loss.
    """
    if not history.get("loss"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(e) + 1 for e in history.get("epoch", range(len(history["loss"])))]
    keys = ("loss", "knn_top1", "teacher_entropy", "query_agreement", "learning_rate", "teacher_temp")
    panels = [k for k in keys if k in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        # The loss panel also shows each term, so a term that stalls (MIM, queries) is visible.
        lines = [key] + ([t for t in ("cls", "mim", "query") if t in history] if key == "loss" else [])
        for line in lines:
            values = history[line]
            if key == "knn_top1":  # evaluated every few epochs: join the points that exist
                kept = [(e, v) for e, v in zip(epochs, values) if v == v]
                ax.plot([e for e, _ in kept], [v for _, v in kept], marker="o", markersize=3, label=line)
                continue
            ax.plot(epochs, values, marker="o", markersize=3, label=line)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
