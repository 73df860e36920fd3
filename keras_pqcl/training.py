"""Run a recipe end to end: data, model, optimizer, callbacks, ``fit``, artefacts.

Used by ``keras-pqcl pretrain``; importable for scripts and notebooks::

    from keras_pqcl.recipe import load_recipe
    from keras_pqcl.training import pretrain
    pretrain(load_recipe("tiny"), "runs/tiny")
"""

import dataclasses
import json
import time
from typing import Callable

import keras

from keras_pqcl import backbones, backend, callbacks, models, optimizers, processes
from keras_pqcl.backend import distribution_scope
from keras_pqcl.callbacks.epoch_log import read_log
from keras_pqcl.io.files import atomic_write, atomic_write_text
from keras_pqcl.io.init_from import check_init_from
from keras_pqcl.plots import plot_log
from keras_pqcl.recipe import check_recipe, check_resume, knn_splits


@dataclasses.dataclass(frozen=True)
class Method:
    """How the runner builds one pre-training method: its model class, the arguments a
    method name fixes, and its optimizer. Everything else, the backbone arguments, the
    batches and the network to transfer, is the model's own declaration
    (:meth:`~keras_pqcl.models.SelfSupervisedModel.needs` and ``transfer``), read for the
    recipe's ``method_args``.

    Attributes:
        model_class: the model (a :class:`~keras_pqcl.models.SelfSupervisedModel`).
        fixed: constructor arguments the method name implies (``dino_pqcl``:
            ``base="dino"``); the recipe's ``method_args`` win over them.
        optimizer: ``(recipe, steps_per_epoch) -> optimizer`` (the DINO AdamW by default; the
            contrastive ResNet methods use torch-style SGD).
    """

    model_class: type
    fixed: dict = dataclasses.field(default_factory=dict)
    optimizer: Callable = None

    def arguments(self, recipe):
        """The model's constructor arguments (besides the backbone) for ``recipe``."""
        return {**self.fixed, **recipe.method_args}

    def needs(self, recipe):
        """The model's :class:`~keras_pqcl.models.needs.Needs` for ``recipe``."""
        return self.model_class.needs(**self.arguments(recipe))

    def model(self, recipe, backbone):
        """The (uncompiled) model of ``recipe`` around the student ``backbone``."""
        return self.model_class(backbone, teacher_momentum=recipe.teacher_momentum, **self.arguments(recipe))


def _optimizer(factory, **fields):
    """``(recipe, steps_per_epoch) -> optimizer`` of ``factory`` with the recipe's schedule
    over ``epochs x steps_per_epoch``; ``fields``: further arguments -> recipe fields."""

    def build(recipe, steps_per_epoch):
        return factory(
            recipe.batch_size,
            recipe.epochs,
            steps_per_epoch,
            base_lr=recipe.base_lr,
            min_lr=recipe.min_lr,
            warmup_epochs=recipe.warmup_epochs,
            weight_decay=recipe.weight_decay,
            **{name: getattr(recipe, field) for name, field in fields.items()},
        )

    return build


def dataset_args(recipe):
    """The extra :func:`keras_pqcl.data.pretrain_dataset` arguments the method's batches
    need: iBOT ``masks`` (``"global_masks"``), PQCL ``queries`` (``"query_coords"``)."""
    from keras_pqcl.data import MaskConfig, QueryConfig

    needs, args = method_of(recipe).needs(recipe), {}
    if needs.queries:
        args["queries"] = QueryConfig(patch_size=recipe.patch_size, **recipe.queries)
    if needs.masks:
        args["masks"] = MaskConfig(patch_size=recipe.patch_size, **recipe.masks)
    return args


_ADAMW = _optimizer(optimizers.dino_adamw, weight_decay_end="weight_decay_end", clip_per_tensor="clip_grad")

#: method name -> :class:`Method`. ``dino_pqcl`` is ``pqcl`` with ``base="dino"``.
METHODS = {
    "dino": Method(models.DINO),
    "ibot": Method(models.IBOT),
    "pqcl": Method(models.PQCL),
    "dino_pqcl": Method(models.PQCL, fixed={"base": "dino"}),
    "adclr": Method(models.ADCLR),
    "densecl": Method(models.DenseCL, optimizer=_optimizer(optimizers.moco_sgd)),
    "mcl": Method(models.MCL),
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
    needs = method_of(recipe).needs(recipe)
    # A method without a required table gets the ViT's learned one (DINO, iBOT).
    args = {"pos_embed": needs.pos_embed or "learned"}
    if needs.mask_token:
        args["use_mask_token"] = True
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


def build_dataset(recipe, start=(0, 0), stop=None, shard=None):
    """``(dataset, info, image_size, steps_per_epoch)``: the method's batches of ``recipe.data``
    for epochs ``start[0]`` (from its step ``start[1]``) to ``stop`` (default
    ``recipe.epochs``), exclusive.

    Every batch is a function of (seed, epoch, step) alone, so a stream built to resume at
    ``start`` continues exactly where an uninterrupted run would be. ``shard`` (a
    :class:`~keras_pqcl.data.Shard`, multi-crop batches only): this process's
    ``recipe.batch_size / N`` examples of each global batch; None: the whole batch.
    """
    from keras_pqcl import data

    stop = recipe.epochs if stop is None else stop
    stream = dict(epochs=stop, steps_per_epoch=recipe.steps_per_epoch, start=tuple(start))
    stream.update(batch_size=recipe.batch_size, shuffle=True, seed=recipe.seed, return_info=True)
    if shard is not None:
        stream["shard"] = shard
    if method_of(recipe).needs(recipe).batches == "montage":
        # MCL: views and montages of each image; recipe.crops holds MontageConfig's arguments.
        config = data.MontageConfig(**recipe.crops)
        dataset, info = data.mcl_dataset(recipe.data, config, **stream)
        image_size = config.image_size
    else:
        crops = data.MultiCropConfig(**recipe.crops)
        crops.check_patch_size(recipe.patch_size)
        dataset, info = data.pretrain_dataset(recipe.data, crops=crops, **stream, **dataset_args(recipe))
        image_size = crops.global_size
    total = int(dataset.cardinality())
    steps = (total + start[1]) // max(stop - start[0], 1)
    if total <= 0 or steps < 1:
        raise ValueError(
            f"{recipe.data!r} gives no full batch of {recipe.batch_size} images, so a run would train 0 steps; "
            "lower --batch-size or add images."
        )
    return dataset, info, image_size, steps


def build_optimizer(recipe, steps_per_epoch):
    """The method's optimizer with the recipe's schedule over ``epochs x steps_per_epoch``."""
    return (method_of(recipe).optimizer or _ADAMW)(recipe, steps_per_epoch)


def build_model(recipe, steps_per_epoch, image_size):
    """The compiled model of ``recipe``; its student backbone starts from ``recipe.init_from``
    when set, and the model copies the student into the teacher as it is built, so both do."""
    backbone = build_backbone(recipe, image_size)
    if recipe.init_from:
        from keras_pqcl.io.init_from import init_backbone_from

        init_backbone_from(backbone, recipe.init_from)
    model = method_of(recipe).model(recipe, backbone)
    model.compile(optimizer=build_optimizer(recipe, steps_per_epoch), jit_compile=recipe.jit_compile)
    return model


def pretrain(recipe, output_dir, resume=False, verbose=1, overwrite=False):
    """Pre-train with ``recipe``, writing everything to ``output_dir``.

    ``output_dir`` receives ``teacher_backbone.keras`` and ``student_backbone.keras`` (load
    them with ``keras.saving.load_model`` after ``import keras_pqcl``), ``log.csv``,
    ``tensorboard/``, ``checkpoints/``, ``recipe.json``, ``summary.json`` and ``loss.png``.

    The folder belongs to this run while it lasts (``run.lock``). A folder that holds
    another run is refused unless ``resume=True`` continues it or ``overwrite=True``
    replaces it. A resumed run continues from the newest checkpoint that loads, with the
    same batches, random draws and schedules as if it had never stopped, and ``log.csv`` is
    cut back to that checkpoint. A larger ``recipe.epochs`` on resume recomputes the
    per-step schedules (learning rate, weight decay, teacher momentum) for the new length
    from the resumed step on, as the DINO reference does when restarted with a larger
    ``--epochs``; other settings that shaped the checkpoint cannot change (see
    :data:`keras_pqcl.recipe.RESUMABLE_FIELDS`).

    ``recipe.init_from`` (continued pre-training) starts the student and teacher backbones
    from a saved backbone; a resumed run with a checkpoint takes the checkpoint's weights.

    In a multi-process run (``torchrun``, ``jax.distributed``, ``TF_CONFIG``: see
    :mod:`keras_pqcl.processes`) every process calls this with the same arguments and trains
    the same model as one process would (a ResNet's BatchNorm aside); process 0 alone owns
    the folder and writes.

    Args:
        recipe: a :class:`~keras_pqcl.Recipe`.
        output_dir: the run's folder.
        resume: continue the run in ``output_dir`` (a missing or empty folder starts anew).
        verbose: 1 progress bar, 0 none (notices are printed either way).
        overwrite: delete the run in ``output_dir`` first.

    Returns:
        dict summary (epochs, steps, images/s, first and last loss, last k-NN top-1, collapse
        message, paths; ``transfer_backbone`` is the one to evaluate and fine-tune); None in
        the processes other than process 0 of a multi-process run.
    """
    from keras_pqcl.run_folder import RunFolder

    count = processes.join()
    check_recipe(recipe)
    if count > 1:
        processes.check(recipe, method_of(recipe).needs(recipe), count)
    if recipe.init_from and not resume:
        # A resumed run may not need the file (its checkpoint wins): _pretrain checks it then.
        check_init_from(recipe.init_from)
    if count > 1 and not backend.is_chief():
        # Not entered: no lock taken, nothing deleted. The barrier waits for the chief to own
        # the folder (and, with overwrite, to have emptied it) before anything is read.
        folder = RunFolder(output_dir, resume=resume, overwrite=overwrite)
        backend.barrier()
        with processes.silenced():
            return _pretrain(recipe, folder, resume, 0, count)
    with RunFolder(output_dir, resume=resume, overwrite=overwrite) as folder:
        if count > 1:
            backend.barrier()
        return _pretrain(recipe, folder, resume, verbose, count)


def _pretrain(recipe, folder, resume, verbose, count):
    chief = count == 1 or backend.is_chief()
    ckpt_dir = folder.join("checkpoints")
    previous = folder.previous_recipe() if resume else None
    model, progress = None, None
    keras.mixed_precision.set_dtype_policy(recipe.precision)
    keras.utils.set_random_seed(recipe.seed)
    if resume:
        asked_init = recipe.init_from
        recipe = _keep_init_from(previous, recipe)
        if previous is not None:
            check_resume(previous, recipe)
        with distribution_scope():
            model, progress = _resume(recipe, folder, ckpt_dir)
        if progress is not None and progress.metadata.get("recipe"):
            # The checkpoint's own record wins over recipe.json, which may be lost or stale.
            previous = progress.metadata["recipe"]
            recipe = _keep_init_from(previous, recipe)
            check_resume(previous, recipe)
        if recipe.init_from and asked_init:
            if progress is not None:
                print(
                    f"keras-pqcl: init_from {recipe.init_from!r} not loaded: the checkpoint {progress.path} "
                    "already holds the trained weights."
                )
            else:
                check_init_from(recipe.init_from)  # a new run after all: before the data is built

    start = (progress.epoch, progress.step) if progress else (0, 0)
    epoch, step = start
    rest = None
    shard = backend.process_shard() if count > 1 else None
    if step:
        # A run resumed mid-epoch finishes that epoch in a fit of its own, shorter than an epoch.
        rest, _, image_size, steps = build_dataset(recipe, start=start, stop=epoch + 1, shard=shard)
        later = epoch + 1 < recipe.epochs
        dataset = build_dataset(recipe, start=(epoch + 1, 0), shard=shard)[0] if later else None
    else:
        dataset, _, image_size, steps = build_dataset(recipe, start=start, shard=shard)
    if progress is not None and progress.steps_per_epoch != steps:
        raise ValueError(
            f"the data now gives {steps} steps per epoch, but the checkpoint {progress.path} was trained with "
            f"{progress.steps_per_epoch}; resume with the same data, batch_size and steps_per_epoch."
        )
    # On the chief alone, on a process-local copy of the backbone (no collectives), so the
    # other processes just wait for it at the next step.
    knn = knn_monitor(recipe, image_size, local_copy=count > 1) if chief else None
    if chief:
        atomic_write_text(folder.join("recipe.json"), recipe.to_json())

    with distribution_scope():
        if model is None:
            model = build_model(recipe, steps, image_size)
        elif previous is not None and previous.get("epochs") != recipe.epochs:
            # fit() sets every schedule's length from its run_epochs (configure_schedules).
            print(
                f"keras-pqcl: the run now lasts {recipe.epochs} epochs (was {previous.get('epochs')}): the "
                "learning-rate, weight-decay and momentum schedules follow the new length from here on."
            )
    if count > 1:
        processes.share_chief_weights(model)

    csv_path = folder.join("log.csv")
    collapse = callbacks.CollapseGuard(stop=recipe.stop_on_collapse)
    checkpoint = callbacks.Checkpoint(
        ckpt_dir,
        every=recipe.checkpoint_every,
        every_steps=recipe.checkpoint_every_steps,
        every_minutes=recipe.checkpoint_every_minutes,
        keep=recipe.keep_checkpoints,
        epochs=recipe.epochs,
        resume_from=progress,
        metadata={"recipe": json.loads(recipe.to_json())},
        write=chief,
    )
    loggers = (
        [
            callbacks.EpochLog(csv_path, start_epoch=start[0]),
            keras.callbacks.TensorBoard(folder.join("tensorboard"), write_graph=False),
        ]
        if chief
        else []
    )
    cbs = [
        callbacks.NaNGuard(ckpt_dir),
        collapse,
        # Before the loggers, which only see what earlier callbacks wrote into the logs.
        *([knn] if knn else []),
        *loggers,
        # After the loggers: an epoch's checkpoint is written after its log row, so a kill
        # between the two resumes from the previous checkpoint and the row is cut and
        # written again. The other processes keep it for its restored metric sums.
        checkpoint,
        *([processes.StopTogether()] if count > 1 else []),
    ]
    began = time.time()
    clock = dict(callbacks=cbs, verbose=verbose, run_epochs=recipe.epochs, epoch_steps=steps)
    if rest is not None:
        model.fit(rest, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps - step, **clock)
        epoch += 1
    if epoch < recipe.epochs and not model.stop_training:
        model.fit(dataset, epochs=recipe.epochs, initial_epoch=epoch, steps_per_epoch=steps, **clock)
    seconds = time.time() - began
    if not chief:
        return None

    paths = {role: folder.join(f"{role}_backbone.keras") for role in ("teacher", "student")}
    with backend.process_local():  # the chief alone: the other processes have left
        for role, path in paths.items():
            atomic_write(path, getattr(model, f"{role}_backbone").save)
    history = read_log(csv_path)
    plot_path = plot_log(history, folder.join("loss.png"), terms=model.loss_terms)
    trained_steps = recipe.epochs * steps - (start[0] * steps + start[1])
    knn_scores = [v for v in history.get("knn_top1", []) if v == v]
    summary = {
        "recipe": recipe.name,
        "backend": keras.backend.backend(),
        "epochs": recipe.epochs,
        "steps_per_epoch": steps,
        "resumed_from": progress.path if progress else None,
        "seconds": round(seconds, 1),
        "images_per_second": round(trained_steps * recipe.batch_size / max(seconds, 1e-9), 2),
        "first_loss": history["loss"][0] if history.get("loss") else None,
        "last_loss": history["loss"][-1] if history.get("loss") else None,
        **{f"{role}_backbone": path for role, path in paths.items()},
        "transfer_backbone": paths[method_of(recipe).model_class.transfer],
        "checkpoint": checkpoint.last_path,
        "log": csv_path,
        "plot": plot_path,
        "collapse": collapse.message,
        "knn_top1": knn_scores[-1] if knn_scores else None,
    }
    atomic_write_text(folder.join("summary.json"), json.dumps(summary, indent=2))
    return summary


def _keep_init_from(previous, recipe):
    """A resume needs no ``--init-from``: the run keeps the file it started from (a different
    file is still refused by :func:`check_resume`)."""
    if previous and previous.get("init_from") and recipe.init_from is None:
        return recipe.replace(init_from=previous["init_from"])
    return recipe


def _resume(recipe, folder, ckpt_dir):
    """``(model, progress)`` of the newest usable checkpoint, ``(None, None)`` for a new run."""
    model, progress = callbacks.load_latest_checkpoint(ckpt_dir)
    if model is None:
        print(f"keras-pqcl: no checkpoint in {ckpt_dir}; starting from scratch.")
        return None, None
    if progress.global_step >= recipe.epochs * progress.steps_per_epoch:
        raise ValueError(
            f"the run in {folder.shown!r} has already trained all {progress.epoch} of its epochs "
            f"({progress.path}); pass --epochs N with N > {progress.epoch} to train it longer."
        )
    print(f"keras-pqcl: resuming from {progress.path} {progress.describe()}.")
    return model, progress


#: held-out images per split of the k-NN monitor on ``synthetic_scenes`` (bank, queries).
KNN_SYNTHETIC_IMAGES = (1000, 500)


def knn_monitor(recipe, image_size, local_copy=False):
    """The :class:`~keras_pqcl.callbacks.KNNMonitor` a recipe asks for, or None (``knn_every=0``).
    It scores the method's transfer network (see :class:`Method`); ``local_copy``: a copy of
    it on this process alone (the chief of a multi-process run)."""
    if not recipe.knn_every:
        return None
    if recipe.knn_data:
        train, test = knn_splits(recipe)
    elif recipe.data.startswith("synthetic_scenes"):
        from keras_pqcl.data.sources import parse_synthetic
        from keras_pqcl.data.synthetic import synthetic_scenes

        _, size = parse_synthetic(recipe.data)
        splits = [synthetic_scenes(n, image_size=size, seed=seed) for n, seed in zip(KNN_SYNTHETIC_IMAGES, (1, 2))]
        train, test = ((split["images"], split["labels"]) for split in splits)
    else:
        raise ValueError(
            f"knn_every={recipe.knn_every} needs labelled held-out images: set knn_data to a folder with "
            f"train/ and val/ sub-folders of class folders (the data {recipe.data!r} has no held-out split)."
        )
    return callbacks.KNNMonitor(
        train,
        test,
        every=recipe.knn_every,
        image_size=image_size,
        use=method_of(recipe).model_class.transfer,
        last_epoch=recipe.epochs - 1,
        local_copy=local_copy,
    )
