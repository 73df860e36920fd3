"""Export a backbone for serving: a TensorFlow SavedModel, an ONNX file or a LiteRT flatbuffer.

The exported function takes images as the backbone does (``(B, H, W, 3)`` float32, already
normalised) and returns two named outputs: ``"cls"`` ``(B, D)`` and ``"patches"`` (the
backbone contract's features, see :mod:`keras_pqcl.backbones.base`: ``(B, N, D)`` tokens for
a ViT, the ``(B, h, w, D)`` C5 map for a ResNet). The batch size is free; height and width
are fixed at ``image_size`` unless ``dynamic_size=True``.

Which format works on which Keras backend (:data:`SUPPORT`) is decided before any work
starts, so an unsupported pair fails with one line naming what to run instead.
"""

import os

import keras

FORMATS = ("saved_model", "onnx", "litert")
#: Keras' names for the formats (``Model.export(format=...)``).
_KERAS_FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx", "litert": "litert"}

_TF = "rerun with --backend tensorflow (KERAS_BACKEND=tensorflow)"
#: ``(backend, format) -> None`` when the pair exports, else why not and what to do instead.
SUPPORT = {
    ("tensorflow", "saved_model"): None,
    ("tensorflow", "onnx"): None,
    ("tensorflow", "litert"): None,
    ("jax", "saved_model"): None,
    # Keras converts JAX to ONNX with jax2onnx, which pulls in flax, orbax and tensorstore.
    ("jax", "onnx"): "onnx export on the JAX backend needs the jax2onnx package (with flax, orbax and "
    f"tensorstore), which keras-pqcl does not support; {_TF} or --backend torch",
    ("jax", "litert"): f"litert export needs the TensorFlow backend (Keras has no JAX converter): {_TF}",
    # Keras writes a SavedModel from PyTorch through torch_xla's StableHLO bridge.
    ("torch", "saved_model"): "saved_model export on the torch backend needs torch_xla, which has no build for "
    f"the CPU torch keras-pqcl pins; {_TF} or --backend jax",
    ("torch", "onnx"): None,
    # Keras converts PyTorch to LiteRT with litert-torch, a large package with its own JAX and TF pins.
    ("torch", "litert"): f"litert export on the torch backend needs the litert-torch package, which keras-pqcl "
    f"does not support; {_TF}",
}
#: Pairs that export with free height and width; the others take one fixed --image-size.
DYNAMIC_SIZE = {
    ("tensorflow", "saved_model"),
    ("tensorflow", "onnx"),
    ("tensorflow", "litert"),
    ("jax", "saved_model"),
    ("torch", "onnx"),
}


def check_support(backend, format, dynamic_size=False):
    """Raise one ValueError if ``format`` (with ``dynamic_size``) cannot be written on ``backend``."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not an export format; pick one of {', '.join(FORMATS)}.")
    reason = SUPPORT.get((backend, format), f"the {backend} backend has no exporter; {_TF}")
    if reason:
        raise ValueError(f"cannot export {format} on the {backend} backend: {reason}.")
    if dynamic_size and (backend, format) not in DYNAMIC_SIZE:
        works = sorted(f"{b}/{f}" for b, f in DYNAMIC_SIZE)
        raise ValueError(
            f"--dynamic-size is not supported for {format} on the {backend} backend; export one "
            f"file per --image-size, or use one of: {', '.join(works)}."
        )


def export_backbone(
    path_or_backbone, output, format="saved_model", image_size=None, dynamic_size=False, use=None, verbose=False
):
    """Write the backbone's serving function (``"cls"`` and ``"patches"`` outputs) to ``output``.

    Built on ``keras.Model.export``; on the torch backend ONNX is written with
    ``torch.onnx.export`` (dynamo) directly, since Keras' path for a free batch size uses the
    TorchScript exporter, which cannot trace the layer normalisation.

    Args:
        path_or_backbone: a ``.keras`` backbone file (``teacher_backbone.keras``), a whole
            pre-training checkpoint together with ``use``, or a backbone model.
        output: the SavedModel folder, the ``.onnx`` file or the ``.tflite`` file.
        format: ``"saved_model"``, ``"onnx"`` or ``"litert"`` (see :data:`SUPPORT`).
        image_size: the fixed input side (default: the backbone's ``image_size``); a
            multiple of the patch size.
        dynamic_size: leave height and width free (each a multiple of the patch size at
            run time); exclusive with ``image_size``.
        use: ``"teacher"`` or ``"student"``: the backbone to take from a whole checkpoint.
        verbose: let the converters print.

    Returns:
        ``output``.

    Raises:
        ValueError: an unsupported backend/format pair, a file that holds no backbone, a
            whole checkpoint without ``use``, or a bad ``image_size``.
        FileNotFoundError: the file does not exist.
    """
    backend = keras.backend.backend()
    check_support(backend, format, dynamic_size)
    if dynamic_size and image_size is not None:
        raise ValueError("pass either --image-size or --dynamic-size, not both.")
    backbone = _backbone(path_or_backbone, use)
    if backbone.compute_dtype != "float32":
        raise ValueError(
            f"the backbone computes in {backbone.compute_dtype}; export needs float32: rebuild it "
            "with dtype='float32' and copy the weights (model.set_weights(old.get_weights()))."
        )
    patch = int(backbone.patch_size)
    size = image_size if image_size is not None else getattr(backbone, "image_size", None)
    if size is None:
        raise ValueError(f"{type(backbone).__name__} has no image_size; pass --image-size (a multiple of {patch}).")
    if size <= 0 or size % patch:
        lo, hi = max(size // patch, 1) * patch, (max(size, 0) // patch + 1) * patch
        raise ValueError(f"--image-size {size} is not a positive multiple of the patch size {patch}; use {lo} or {hi}.")
    output = os.fspath(output)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)

    serving = BackboneServing(backbone)
    serving(keras.ops.zeros((1, size, size, 3)))  # builds the wrapper at the size it will serve
    side = None if dynamic_size else size
    signature = [keras.InputSpec(shape=(None, side, side, 3), dtype="float32", name="images")]
    if backend == "torch" and format == "onnx":
        _torch_onnx(serving, output, size, dynamic_size, verbose)
    else:
        if backend == "tensorflow" and format == "onnx":
            _register_erfc()
        options = {}
        if backend == "jax" and dynamic_size:
            # Height and width as (grid side) x (patch), so that jax2tf knows they divide evenly
            # (its shape checks of the strided patch convolution are inconclusive otherwise).
            shapes = f"(batch, {patch} * grid_h, {patch} * grid_w, 3)"
            options["jax2tf_kwargs"] = {"polymorphic_shapes": [shapes]}
        serving.export(output, format=_KERAS_FORMATS[format], input_signature=signature, verbose=verbose, **options)
    return output


def _backbone(path_or_backbone, use):
    """The backbone to export: a model with ``forward_features``, or one read from a file."""
    from keras_pqcl.io.load import check_archive, load_backbone

    if not isinstance(path_or_backbone, (str, os.PathLike)):
        if not hasattr(path_or_backbone, "forward_features"):
            raise ValueError(
                f"{type(path_or_backbone).__name__} is not a keras_pqcl backbone (no forward_features); "
                "pass a ViT or ResNet backbone or its .keras file."
            )
        return path_or_backbone
    path = os.fspath(path_or_backbone)
    check_archive(path)
    if use is None:
        held = _held_class(path)
        if held is not None and not hasattr(held, "forward_features"):
            backbone = load_backbone(path, "teacher")  # a model without backbones fails here, naming the file
            raise ValueError(
                f"{path!r} is a whole pre-training checkpoint ({held.__name__}), not a backbone; pass "
                f"use='teacher' (CLI: --use teacher) to export its {type(backbone).__name__} teacher, or "
                "--use student."
            )
    return load_backbone(path, use or "teacher")


def _held_class(path):
    """The registered class a ``.keras`` file holds (from its config.json), or None if unknown."""
    import json
    import zipfile

    import keras_pqcl  # noqa: F401  (registers the classes looked up below)

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # load_backbone names what is wrong with the file
    if not isinstance(config, dict):
        return None
    name = config.get("registered_name") or config.get("class_name")
    return keras.saving.get_registered_object(name) if isinstance(name, str) else None


class BackboneServing(keras.Model):
    """``images (B, H, W, 3) -> {"cls": (B, D), "patches": ...}``: the backbone's
    ``forward_features`` without what a server does not need (the last blocks, attention),
    so that the export has exactly these two named outputs."""

    def __init__(self, backbone, **kwargs):
        super().__init__(name=f"{backbone.name}_serving", **kwargs)
        self.backbone = backbone

    def call(self, images):
        features = self.backbone.forward_features(images, training=False)
        return {"cls": features["cls"], "patches": features["patches"]}


def _torch_onnx(serving, output, size, dynamic_size, verbose):
    """ONNX from the torch backend through ``torch.onnx.export(dynamo=True)`` with a free batch
    (and free height and width with ``dynamic_size``)."""
    import numpy as np
    import torch

    from keras_pqcl.backbones.vit import VisionTransformer

    serving.eval()
    patch = int(serving.backbone.patch_size)
    axes = {0: torch.export.Dim("batch", min=1, max=65536)}
    if dynamic_size:
        if not isinstance(serving.backbone, VisionTransformer):
            raise ValueError(
                "--dynamic-size on the torch backend is supported for ViT backbones only; export one "
                "file per --image-size."
            )
        # Height and width as (grid side) x (patch), so torch.export knows they divide evenly.
        axes[1] = patch * torch.export.Dim("grid_h", min=1, max=1024)
        axes[2] = patch * torch.export.Dim("grid_w", min=1, max=1024)
    sample = torch.as_tensor(np.zeros((2, size, size, 3), "float32"))
    # The Keras model's forward takes *args, so the shapes are nested one level deeper.
    program = torch.onnx.export(
        serving,
        (sample,),
        dynamo=True,
        input_names=["images"],
        output_names=["cls", "patches"],
        dynamic_shapes=((axes,),),
        verbose=verbose,
    )
    program.optimize()
    program.save(output)


_ERFC_REGISTERED = False


def _register_erfc():
    """Teach tf2onnx TensorFlow's ``Erfc`` (the exact GELU's op), as ``1 - Erf``: ONNX has
    ``Erf`` (opset 9) but no ``Erfc``."""
    global _ERFC_REGISTERED
    if _ERFC_REGISTERED:
        return
    import numpy as np

    try:
        from tf2onnx import utils
        from tf2onnx.handler import tf_op
    except ImportError:
        raise ValueError(
            "onnx export on the TensorFlow backend needs tf2onnx and onnx: pip install "
            "'keras-pqcl[test]' (or pip install tf2onnx onnx)."
        ) from None

    @tf_op("Erfc")
    class Erfc:
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            x = node.input[0]
            dtype = ctx.get_dtype(x)
            erf = ctx.make_node("Erf", [x], shapes=[ctx.get_shape(x)], dtypes=[dtype]).output[0]
            one = ctx.make_const(
                utils.make_name("erfc_one"), np.array(1, dtype=utils.map_onnx_to_numpy_type(dtype))
            ).output[0]
            node.type = "Sub"
            ctx.replace_inputs(node, [one, erf])

    _ERFC_REGISTERED = True
