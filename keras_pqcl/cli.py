"""``keras-pqcl`` command line.

    keras-pqcl pretrain --recipe tiny --output runs/tiny
    keras-pqcl pretrain --recipe dino_vit_small --data /path/to/images --epochs 100 --batch-size 64
    keras-pqcl pretrain --recipe tiny --output runs/tiny --resume
    keras-pqcl pretrain --recipe tiny --output runs/tiny2 --init-from runs/tiny/teacher_backbone.keras
    keras-pqcl recipes
    keras-pqcl eval knn --weights runs/tiny/teacher_backbone.keras
    keras-pqcl eval linear --weights runs/tiny/teacher_backbone.keras --data /path/train --test-data /path/val
    keras-pqcl eval dense --weights runs/tiny/teacher_backbone.keras
    keras-pqcl eval attention --weights runs/tiny/teacher_backbone.keras --image photo.jpg --threshold 0.6
    keras-pqcl finetune segment --weights runs/tiny/teacher_backbone.keras --output runs/seg
    keras-pqcl export --weights runs/tiny/teacher_backbone.keras --format onnx --dynamic-size --output tiny.onnx

The Keras backend is taken from ``KERAS_BACKEND`` or ``--backend``.
"""

import argparse
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(prog="keras-pqcl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pre-train a backbone with a recipe")
    pre.add_argument("--recipe", default="tiny", help="recipe name (see `keras-pqcl recipes`) or path to a .py file")
    pre.add_argument("--data", help="data source: synthetic_scenes[:N], an image folder, or tfds:NAME[/config]")
    pre.add_argument("--epochs", type=int)
    pre.add_argument("--batch-size", type=int, dest="batch_size", help="global batch size")
    pre.add_argument("--steps-per-epoch", type=int, dest="steps_per_epoch", help="cap steps per epoch")
    pre.add_argument("--output", default=None, help="output folder (default runs/<recipe>)")
    pre.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest usable checkpoint (a missing or empty "
        "folder starts a new run)",
    )
    pre.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output (its checkpoints, logs and backbones are deleted)",
    )
    pre.add_argument(
        "--checkpoint-every-steps",
        type=int,
        dest="checkpoint_every_steps",
        help="also checkpoint every N steps inside an epoch (long epochs)",
    )
    pre.add_argument(
        "--checkpoint-every-minutes",
        type=float,
        dest="checkpoint_every_minutes",
        help="also checkpoint every N minutes inside an epoch",
    )
    pre.add_argument(
        "--keep-checkpoints", type=int, dest="keep_checkpoints", help="checkpoints kept, newest first (default 2)"
    )
    pre.add_argument("--precision", choices=["float32", "mixed_bfloat16"])
    pre.add_argument("--seed", type=int)
    pre.add_argument(
        "--knn-every",
        type=int,
        dest="knn_every",
        help="log the teacher's k-NN top-1 every N epochs (0: off; the tiny recipes use 2)",
    )
    pre.add_argument(
        "--knn-data",
        dest="knn_data",
        help="folder with train/ and val/ class folders for --knn-every (synthetic_scenes: held-out images)",
    )
    pre.add_argument(
        "--init-from",
        dest="init_from",
        metavar="FILE",
        help="continued pre-training: start the student and teacher backbones from a .keras backbone "
        "(e.g. an earlier run's teacher_backbone.keras) or a PyTorch DINO/iBOT/PQCL .pth; heads and "
        "schedules start fresh; the architecture must match the recipe's",
    )
    several = pre.add_argument_group(
        "several processes (JAX)",
        "one process of a multi-process JAX run (jax.distributed); each process gets the same command with its "
        "own --process-id. torch: launch with torchrun; TensorFlow: set TF_CONFIG. Under Slurm's srun all three "
        "are read from the environment.",
    )
    several.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (KERAS_PQCL_COORDINATOR)")
    several.add_argument(
        "--num-processes", type=int, dest="num_processes", metavar="N", help="processes (KERAS_PQCL_NUM_PROCESSES)"
    )
    several.add_argument(
        "--process-id", type=int, dest="process_id", metavar="I", help="this process, 0..N-1 (KERAS_PQCL_PROCESS_ID)"
    )
    pre.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")

    rec = sub.add_parser("recipes", help="list the available recipes")
    rec.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help=argparse.SUPPRESS)

    ev = sub.add_parser(
        "eval",
        help="evaluate a saved backbone: k-NN, linear probe, dense probe or attention maps",
        description="Evaluate a saved backbone with the DINO/iBOT protocols. Without --data, held-out "
        "synthetic_scenes splits are used (train seed 1, test seed 2; pre-training uses seed 0).",
    )
    ev.add_argument("protocol", choices=EVAL_PROTOCOLS)
    ev.add_argument(
        "--weights",
        required=True,
        help="saved backbone (.keras), e.g. runs/tiny/teacher_backbone.keras, or a whole-model checkpoint",
    )
    ev.add_argument(
        "--use",
        choices=["teacher", "student"],
        default="teacher",
        help="backbone to take from a whole-model checkpoint (default teacher)",
    )
    ev.add_argument(
        "--data",
        help="train split: synthetic_scenes[:N[:S]] (seed 1, default "
        "synthetic_scenes:2048), a folder (one sub-folder per class; dense: images) or tfds:NAME",
    )
    ev.add_argument(
        "--test-data",
        dest="test_data",
        help="test split (default for synthetic_scenes: seed 2, a quarter of --data's size; required for folders)",
    )
    ev.add_argument("--masks", help="dense: folder of masks for --data, paired by file name (class ids, 255 = ignore)")
    ev.add_argument("--test-masks", dest="test_masks", help="dense: folder of masks for --test-data")
    ev.add_argument("--split", default="train", help="tfds split of --data (default train)")
    ev.add_argument("--test-split", dest="test_split", default="test", help="tfds split of --test-data (default test)")
    ev.add_argument(
        "--image", help="attention: an image file or a .npy array (H, W, 3); default: a synthetic_scenes image"
    )
    ev.add_argument("--output", help="output folder (default: eval/<protocol> next to --weights)")
    ev.add_argument(
        "--image-size",
        type=int,
        dest="image_size",
        help="input side for the backbone (default: its image_size; attention: the image's own size up to 480)",
    )
    ev.add_argument("--epochs", type=int, help="linear (default 100) and dense (default 30) probes")
    ev.add_argument(
        "--lr",
        type=_rates,
        help="probe learning rate (linear default 1e-3 * batch / 256, dense 1e-2); linear also takes "
        "a comma-separated sweep, e.g. 1e-3,1e-2,1e-1, and reports the best rate",
    )
    ev.add_argument("--batch-size", type=int, dest="batch_size", help="probe batch size (linear 256, dense 16)")
    ev.add_argument("--k", type=int, default=20, help="k-NN neighbours (default 20)")
    ev.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature (default 0.07)")
    ev.add_argument(
        "--n-last-blocks",
        type=int,
        dest="n_last_blocks",
        help="CLS tokens of the last n blocks (linear default 4, k-NN 1)",
    )
    ev.add_argument(
        "--avgpool",
        type=int,
        choices=[0, 1, 2],
        default=0,
        help="0 CLS, 1 mean patch token, 2 both (iBOT avgpool_patchtokens)",
    )
    ev.add_argument(
        "--threshold",
        type=float,
        help="attention: also save masks of the patches holding this fraction of the mass (e.g. 0.6)",
    )
    ev.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a saved backbone for a downstream task (segment)",
        description="Fine-tune a saved backbone for semantic segmentation (kp.tasks). Without --data, "
        "synthetic_scenes splits are used (train seed 1, validation seed 2).",
    )
    ft.add_argument("task", choices=["segment"])
    ft.add_argument("--weights", required=True, help="saved backbone (.keras) or a whole-model checkpoint")
    ft.add_argument(
        "--use",
        choices=["teacher", "student"],
        default="teacher",
        help="backbone to take from a whole-model checkpoint (default teacher)",
    )
    ft.add_argument(
        "--data",
        default="synthetic_scenes:256",
        help="training images: synthetic_scenes[:N[:S]] (default synthetic_scenes:256) or a folder",
    )
    ft.add_argument("--masks", help="folder of masks for --data, paired by file name (class ids, 255 = ignore)")
    ft.add_argument("--val-data", dest="val_data", help="validation images (required for folders)")
    ft.add_argument("--val-masks", dest="val_masks", help="masks for --val-data")
    ft.add_argument(
        "--num-classes",
        type=int,
        dest="num_classes",
        help="classes (default: synthetic_scenes' 11, or the largest id in the masks + 1)",
    )
    ft.add_argument("--image-size", type=int, dest="image_size", help="resize folder images to this side")
    ft.add_argument("--crop-size", type=int, dest="crop_size", help="training crop side (default: the image side)")
    ft.add_argument("--decoder", choices=["upernet", "fpn", "linear"], default="upernet")
    ft.add_argument("--channels", type=int, default=256, help="FPN/UperNet decoder width (default 256)")
    ft.add_argument("--epochs", type=int, default=10)
    ft.add_argument("--batch-size", type=int, dest="batch_size", default=8)
    ft.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the decoder (default 1e-4)")
    ft.add_argument("--layer-decay", type=float, dest="layer_decay", default=0.65)
    ft.add_argument("--weight-decay", type=float, dest="weight_decay", default=0.05)
    ft.add_argument("--freeze-backbone", action="store_true", dest="freeze_backbone", help="train the decoder only")
    ft.add_argument(
        "--output",
        required=True,
        help="output folder: log.csv, loss.png, checkpoints/, segmenter.keras, summary.json, predictions.png",
    )
    ft.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its newest checkpoint (same settings)",
    )
    ft.add_argument("--overwrite", action="store_true", help="replace the run in --output")
    ft.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation (default 0)")
    ft.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    ft.add_argument("--quiet", action="store_true", help="no progress output")
    ex = sub.add_parser(
        "export",
        help="export a saved backbone for serving: TF SavedModel, ONNX or LiteRT",
        description="Write the backbone's serving function: input images (B, H, W, 3) float32 as the backbone "
        "takes them, outputs 'cls' (B, D) and 'patches' (the patch tokens). Which formats work depends on the "
        "backend (see the README's Export table).",
    )
    ex.add_argument("--weights", required=True, help="saved backbone (.keras), e.g. runs/tiny/teacher_backbone.keras")
    ex.add_argument(
        "--format",
        required=True,
        metavar="{saved_model,onnx,litert}",
        help="saved_model (a folder), onnx (a .onnx file) or litert (a .tflite file)",
    )
    ex.add_argument("--output", required=True, help="the SavedModel folder, .onnx file or .tflite file to write")
    ex.add_argument(
        "--image-size", type=int, dest="image_size", help="fixed input side (default: the backbone's image_size)"
    )
    ex.add_argument(
        "--dynamic-size",
        action="store_true",
        dest="dynamic_size",
        help="free height and width (multiples of the patch size at run time)",
    )
    ex.add_argument(
        "--use", choices=["teacher", "student"], help="backbone to take from a whole pre-training checkpoint"
    )
    ex.add_argument("--backend", choices=["tensorflow", "jax", "torch"], help="Keras backend (default: KERAS_BACKEND)")
    return parser


EVAL_PROTOCOLS = ("knn", "linear", "dense", "attention")
# Held-out synthetic_scenes splits: pre-training always generates seed 0.
EVAL_TRAIN_SEED = 1
EVAL_TEST_SEED = 2
# The reference visualises attention at 480 px; larger images would make N^2 attention huge.
ATTENTION_MAX_SIDE = 480


def _rates(text):
    """``--lr``: one rate, or a comma-separated sweep (a list) for the linear probe."""
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate or a comma-separated list of rates (e.g. 1e-2 or 1e-3,1e-2,1e-1)"
        ) from None
    return rates[0] if len(rates) == 1 else rates


def _use_backend(backend):
    """Re-run this command under ``backend`` if Keras was already imported with another."""
    if not backend:
        return
    import keras

    if keras.backend.backend() != backend:
        os.environ["KERAS_BACKEND"] = backend
        os.execv(sys.executable, [sys.executable, "-m", "keras_pqcl.cli", *sys.argv[1:]])


def _silent(*args, **kwargs):
    pass


def _one_line_warning(message, category, filename, lineno, line=None):
    # A user of the CLI needs the message, not the library line that raised it.
    return f"keras-pqcl: warning: {message}\n"


def main(argv=None):
    import warnings

    warnings.formatwarning = _one_line_warning
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        # Bad input or a diverged run: the message says what to change, a traceback adds noise.
        _error_line(str(error))
        return 2
    except OSError as error:  # permissions, a full disk: the system's words and the file
        where = f": {error.filename}" if error.filename else ""
        _error_line(f"{error.strerror or error}{where}")
        return 2


def _error_line(message):
    # One write of the whole line: under torchrun every process may print the same error into
    # one pipe, and print's separate write of the newline would let two lines interleave.
    sys.stderr.write(f"keras-pqcl: error: {message}\n")
    sys.stderr.flush()


def _main(argv):
    args = _parser().parse_args(argv)
    _use_backend(getattr(args, "backend", None))
    from keras_pqcl.recipe import available_recipes, load_recipe

    if args.command == "recipes":
        for name in available_recipes():
            print(f"{name:20s} {load_recipe(name).description}")
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "export":
        return _export(args)

    from keras_pqcl.data import tune_input_pipeline

    # Before TensorFlow runs its first op, or the settings cannot take effect.
    tuned = tune_input_pipeline()
    from keras_pqcl import backend, processes

    # Join the other processes (if any) before any model or tensor exists. Only process 0
    # speaks; the others print nothing but errors.
    processes.join(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    say = print if backend.is_chief() else _silent
    recipe = load_recipe(args.recipe).replace(
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        precision=args.precision,
        seed=args.seed,
        knn_every=args.knn_every,
        knn_data=args.knn_data,
        checkpoint_every_steps=args.checkpoint_every_steps,
        checkpoint_every_minutes=args.checkpoint_every_minutes,
        keep_checkpoints=args.keep_checkpoints,
        init_from=args.init_from,
    )
    output = args.output or os.path.join("runs", recipe.name)

    import keras

    from keras_pqcl.training import pretrain

    say(
        f"keras-pqcl: recipe {recipe.name!r} ({recipe.method}, {recipe.backbone}/{recipe.patch_size}) "
        f"on backend {keras.backend.backend()}, {recipe.epochs} epochs, batch {recipe.batch_size}, "
        f"data {recipe.data!r} -> {output}"
    )
    say(
        f"keras-pqcl: input pipeline: TensorFlow {'BFC' if tuned['bfc_allocator'] else 'default'} CPU "
        f"allocator, {tuned['intra_op_threads'] or 'default'} intra-op thread(s) "
        "(keras_pqcl.data.tune_input_pipeline)"
    )
    summary = pretrain(recipe, output, resume=args.resume, overwrite=args.overwrite, verbose=0 if args.quiet else 1)
    if summary is None:  # a process other than the chief of a multi-process run
        return 0
    print("\nDone.")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:{width}s}  {value}")
    return 0


# ------------------------------------------------------------------------------------ eval
def _is_synthetic(spec):
    return spec is None or spec == "synthetic_scenes" or spec.startswith("synthetic_scenes:")


def _synthetic(spec, seed):
    """``synthetic_scenes[:N[:S]]`` generated with ``seed`` -> (arrays dict, description)."""
    from keras_pqcl.data.sources import parse_synthetic
    from keras_pqcl.data.synthetic import synthetic_scenes

    num, size = parse_synthetic(spec or "synthetic_scenes")
    return synthetic_scenes(num, image_size=size, seed=seed), f"synthetic_scenes:{num}:{size} (seed {seed})"


def _test_spec(args):
    """The test split's spec; for synthetic train data a quarter of its size by default."""
    if args.test_data:
        return args.test_data
    if _is_synthetic(args.data):
        from keras_pqcl.data.sources import parse_synthetic

        num, size = parse_synthetic(args.data or "synthetic_scenes")
        return f"synthetic_scenes:{max(num // 4, 1)}:{size}"
    if args.data.startswith("tfds:"):
        return args.data
    raise ValueError("--test-data is required when --data is a folder (the test images must be held out).")


def _split_identity(spec, seed, split):
    """What a split is made of, for telling whether train and test are the same images."""
    if _is_synthetic(spec):
        from keras_pqcl.data.sources import parse_synthetic

        return ("synthetic_scenes", *parse_synthetic(spec or "synthetic_scenes"), seed)
    if spec.startswith("tfds:"):
        return ("tfds", spec[len("tfds:") :].strip("/"), split)
    return ("folder", os.path.realpath(spec))


def _warn_if_same_split(args, test_spec):
    """One stderr line when the test split is the train split: the scores would not generalise."""
    train = _split_identity(args.data, EVAL_TRAIN_SEED, args.split)
    if train != _split_identity(test_spec, EVAL_TEST_SEED, args.test_split):
        return
    what = f"{args.data} ({args.split})" if train[0] == "tfds" else args.data
    print(
        f"keras-pqcl: warning: --test-data is the same as --data ({what}): the scores measure memorisation, "
        "not generalisation; pass a held-out split.",
        file=sys.stderr,
    )


def _labelled(spec, seed, split):
    """A labelled split for k-NN / linear: arrays for synthetic_scenes, a dataset otherwise."""
    if _is_synthetic(spec):
        data, name = _synthetic(spec, seed)
        return (data["images"], data["labels"]), name
    from keras_pqcl.data.sources import load_source

    dataset, info = load_source(spec, shuffle=False, split=split)
    if spec.startswith("tfds:"):
        return dataset, f"{spec} ({split})"
    if not info.class_names:
        raise ValueError(
            f"{spec!r} has no class sub-folders, so its images have no labels; put each class in its own sub-folder."
        )
    return dataset, f"{spec} ({info.num_examples} images, {len(info.class_names)} classes)"


def _segmentation(spec, masks, seed, size, what):
    """``(images, masks, description)`` for the dense probe."""
    if _is_synthetic(spec):
        if masks:
            raise ValueError(
                f"--{what}masks goes with an image folder, not synthetic_scenes (which has its own masks)."
            )
        data, name = _synthetic(spec, seed)
        return data["images"], data["masks"], name
    if spec.startswith("tfds:"):
        raise ValueError("the dense probe reads synthetic_scenes or image/mask folders (--data/--masks), not tfds.")
    if not masks:
        raise ValueError(
            f"--{what}masks is required with a {what or 'train '}image folder: the dense probe needs masks."
        )
    from keras_pqcl.eval import load_segmentation_folder

    data = load_segmentation_folder(spec, masks, size=size)
    return data["images"], data["masks"], f"{spec} + {masks} ({len(data['names'])} pairs)"


def _load_backbone(path, use):
    """The backbone in ``path`` (a backbone file, or a checkpoint's ``use`` backbone)."""
    from keras_pqcl.io.load import load_backbone

    return load_backbone(path, use)


def _read_image(path):
    """``--image`` -> ``(H, W, 3)`` array: uint8, or float in [0, 1] from a float .npy.

    Every way the file can be wrong ends in a ValueError naming it: the CLI prints one line.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"--image {path!r} is a directory; pass one image file (PNG/JPEG) or a .npy array.")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot read --image {path!r} (permission denied); check the file's permissions.")
    import numpy as np

    if path.lower().endswith(".npy"):
        return _image_array(path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))  # as DINO's visualize_attention.py
    except UnidentifiedImageError:
        raise ValueError(f"{path!r} is not an image file PIL can read; pass a PNG/JPEG or a .npy array.") from None
    except Exception as error:  # OSError, SyntaxError, ...: decoders fail in many ways, all the file's fault
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ValueError(
            f"{path!r} is not a readable image (corrupt or truncated): {reason}; re-export it as PNG/JPEG."
        ) from None


def _image_array(path):
    """A .npy ``--image``: ``(H, W, 3)``, ``(1, H, W, 3)`` or grey ``(H, W)``/``(H, W, 1)`` -> ``(H, W, 3)``.

    Integers in [0, 255] come back as uint8, floats (in [0, 1]) as they are.
    """
    import numpy as np

    fix = "save one image with np.save(path, image) where image is (height, width, 3), uint8 or float in [0, 1]"
    try:
        image = np.load(path, allow_pickle=False)
    except Exception as error:  # pickled objects, a damaged header, a truncated body
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise ValueError(f"{path!r} is not a readable .npy array: {reason}; {fix}.") from None
    if not isinstance(image, np.ndarray) or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"{path!r} holds {getattr(image, 'dtype', type(image).__name__)} data, not pixels; {fix}.")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and image.shape[-1] == 4:
        raise ValueError(
            f"{path!r} has shape {image.shape}: the image must have 3 channels (RGB); "
            "drop the alpha channel: image[..., :3]."
        )
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:  # grey, as PIL's convert("RGB") does for grey files
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{path!r} has shape {image.shape}, not (height, width, 3) or (height, width); {fix}.")
    if not image.size:
        raise ValueError(f"{path!r} has shape {image.shape}: an empty image; {fix}.")
    lo, hi = float(image.min()), float(image.max())  # NaN propagates and fails the checks below
    if np.issubdtype(image.dtype, np.integer):
        if not 0 <= lo <= hi <= 255:
            raise ValueError(f"{path!r} holds integers in [{lo:g}, {hi:g}], not pixels in [0, 255]; {fix}.")
        return image.astype(np.uint8)
    if not 0.0 <= lo <= hi <= 1.0 + 1e-6:
        raise ValueError(f"{path!r} holds floats in [{lo:g}, {hi:g}], not in [0, 1]; {fix}.")
    return image


def _eval_attention(args, backbone, output, image=None):
    """Attention/PCA PNGs of ``image`` (``(H, W, 3)`` read from ``--image``; None: a synthetic one)."""
    import numpy as np

    from keras_pqcl import eval as ev

    if image is not None:
        source = args.image
    else:
        data, source = _synthetic("synthetic_scenes:1", EVAL_TEST_SEED)
        image, source = data["images"][0], f"{source}, image 0"
    size = args.image_size
    if size is None and np.ndim(image) == 3 and max(np.shape(image)[:2]) > ATTENTION_MAX_SIDE:
        size = ATTENTION_MAX_SIDE
    shown = ev.prepare_image(image, backbone.patch_size, size)
    maps = ev.attention_maps(backbone, shown)
    files = {"attention": ev.save_attention_png(os.path.join(output, "attention.png"), shown, maps)}
    if args.threshold is not None:
        masks = ev.attention_maps(backbone, shown, threshold=args.threshold)
        path = os.path.join(output, "attention_threshold.png")
        files["attention_threshold"] = ev.save_attention_png(path, shown, masks)
    files["pca"] = ev.save_pca_png(os.path.join(output, "pca.png"), shown, ev.feature_pca(backbone, shown))
    results = {
        "heads": int(maps.shape[0]),
        "height": int(maps.shape[1]),
        "width": int(maps.shape[2]),
        "threshold": args.threshold,
        **files,
    }
    return results, {"image": source}


def _eval(args):
    import json
    import time

    start = time.time()
    if args.protocol != "attention" and args.image:
        raise ValueError("--image is for `eval attention`; the other protocols read --data/--test-data.")
    # A bad --image is reported before the (slower) model load.
    image = _read_image(args.image) if args.protocol == "attention" and args.image else None
    backbone = _load_backbone(args.weights, args.use)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.weights)), "eval", args.protocol)

    import keras

    from keras_pqcl import eval as ev

    print(
        f"keras-pqcl: eval {args.protocol} of {args.weights} ({getattr(backbone, 'name', 'backbone')}) "
        f"on backend {keras.backend.backend()} -> {output}"
    )
    verbose = 0 if args.quiet else 2
    if args.protocol == "attention":
        results, splits = _eval_attention(args, backbone, output, image)
    elif args.protocol == "dense":
        if isinstance(args.lr, list):
            raise ValueError(f"eval dense takes one --lr, got {len(args.lr)}; sweeping rates is for eval linear.")
        size = args.image_size or getattr(backbone, "image_size", None)
        train_images, train_masks, train_name = _segmentation(args.data, args.masks, EVAL_TRAIN_SEED, size, "")
        if args.test_data is None and not _is_synthetic(args.data):
            raise ValueError("--test-data (with --test-masks) is required when --data is a folder.")
        test_spec = _test_spec(args)
        _warn_if_same_split(args, test_spec)
        test_images, test_masks, test_name = _segmentation(test_spec, args.test_masks, EVAL_TEST_SEED, size, "test-")
        # synthetic_scenes: 0 = background and k + 1 = class k; all K + 1 ids count even if a
        # tiny split misses one.
        num_classes = None
        if _is_synthetic(args.data) and _is_synthetic(test_spec):
            from keras_pqcl.data.synthetic import SYNTHETIC_CLASS_NAMES

            num_classes = len(SYNTHETIC_CLASS_NAMES) + 1
        results = ev.dense_probe(
            backbone,
            train_images,
            train_masks,
            test_images,
            test_masks,
            num_classes=num_classes,
            epochs=args.epochs or 30,
            lr=args.lr or 1e-2,
            batch_size=args.batch_size or 16,
            image_size=args.image_size,
            verbose=verbose,
        )
        splits = {"train": train_name, "test": test_name}
    else:
        test_spec = _test_spec(args)
        _warn_if_same_split(args, test_spec)
        train, train_name = _labelled(args.data, EVAL_TRAIN_SEED, args.split)
        test, test_name = _labelled(test_spec, EVAL_TEST_SEED, args.test_split)
        splits = {"train": train_name, "test": test_name}
        if args.protocol == "knn":
            results = ev.knn_evaluate(
                backbone,
                train,
                test,
                k=args.k,
                temperature=args.temperature,
                n_last_blocks=args.n_last_blocks or 1,
                avgpool_patchtokens=args.avgpool,
                image_size=args.image_size,
            )
        else:
            results = ev.linear_probe(
                backbone,
                train,
                test,
                n_last_blocks=args.n_last_blocks or 4,
                avgpool_patchtokens=args.avgpool,
                epochs=args.epochs or 100,
                lr=args.lr,
                batch_size=args.batch_size or 256,
                image_size=args.image_size,
                verbose=verbose,
            )

    os.makedirs(output, exist_ok=True)
    record = {
        "protocol": args.protocol,
        "weights": os.path.abspath(args.weights),
        "backend": keras.backend.backend(),
        **splits,
        "results": results,
        "seconds": round(time.time() - start, 1),
    }
    path = os.path.join(output, "eval.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
    rows = {**splits, **{k: v for k, v in results.items() if isinstance(v, (int, float, str)) or v is None}}
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:{width}s}  {shown}")
    print(f"Wrote {path}")
    return 0


# -------------------------------------------------------------------------------- finetune
def _finetune_split(spec, masks, seed, size, what):
    """A segmentation split as ``{"images", "masks", "names"?}`` and its description."""
    images, mask_arr, name = _segmentation(spec, masks, seed, size, what)
    if _is_synthetic(spec):
        return {"images": images, "masks": mask_arr}, name
    from keras_pqcl.eval.dense import paired_listing  # the loader's pairing order: file names in errors

    paths = paired_listing(masks, "masks")
    return {"images": images, "masks": mask_arr, "names": [paths[k] for k in sorted(paths)]}, name


def _finetune(args):
    backbone = _load_backbone(args.weights, args.use)
    if args.val_data is None and not _is_synthetic(args.data):
        raise ValueError("--val-data (with --val-masks) is required when --data is a folder.")
    train, train_name = _finetune_split(args.data, args.masks, EVAL_TRAIN_SEED, args.image_size, "")
    val_spec = args.val_data
    if val_spec is None:
        from keras_pqcl.data.sources import parse_synthetic

        num, side = parse_synthetic(args.data)
        val_spec = f"synthetic_scenes:{max(num // 4, 1)}:{side}"
    val, val_name = _finetune_split(val_spec, args.val_masks, EVAL_TEST_SEED, args.image_size, "val-")
    num_classes = args.num_classes
    if num_classes is None:
        if _is_synthetic(args.data):
            from keras_pqcl.data.synthetic import SYNTHETIC_CLASS_NAMES

            num_classes = len(SYNTHETIC_CLASS_NAMES) + 1
        else:
            import numpy as np

            ids = np.concatenate([np.unique(train["masks"]), np.unique(val["masks"])])
            num_classes = int(ids[ids != 255].max()) + 1
    from keras_pqcl.tasks.finetune_run import finetune_segmentation

    print(
        f"keras-pqcl: finetune segment of {args.weights} with {args.decoder} on {train_name}, validation "
        f"{val_name}, {num_classes} classes -> {args.output}"
    )
    summary = finetune_segmentation(
        backbone,
        train,
        val,
        num_classes,
        args.output,
        decoder=args.decoder,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        layer_decay=args.layer_decay,
        weight_decay=args.weight_decay,
        crop_size=args.crop_size,
        freeze_backbone=args.freeze_backbone,
        channels=args.channels,
        seed=args.seed,
        verbose=0 if args.quiet else 2,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    for key, value in summary["val"].items():
        print(f"  val {key:8s} {value:.4g}")
    print(f"Wrote {os.path.join(args.output, 'summary.json')}")
    return 0


# ------------------------------------------------------------------------------------ export
def _export(args):
    import time

    import keras

    from keras_pqcl.io.export import export_backbone

    start = time.time()
    size = "free height and width" if args.dynamic_size else f"{args.image_size or 'its own'} px"
    print(
        f"keras-pqcl: export {args.weights} as {args.format} ({size}) on backend {keras.backend.backend()} "
        f"-> {args.output}"
    )
    export_backbone(
        args.weights,
        args.output,
        format=args.format,
        image_size=args.image_size,
        dynamic_size=args.dynamic_size,
        use=args.use,
    )
    print(f"Wrote {args.output} ({time.time() - start:.1f} s); outputs 'cls' and 'patches'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
