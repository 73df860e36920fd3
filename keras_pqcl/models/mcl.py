"""MCL: Multi-Level Contrastive Learning for dense prediction (Guo et al. 2023, arXiv 2304.02010).

BYOL-style online network (ResNet + FPN + region neck + one predictor per level) and an EMA
target network (ResNet + FPN + neck), trained with an InfoNCE over in-batch targets at
temperature 1. Per branch X in {q, k} the online network sees the full views
and the montages (see :mod:`keras_pqcl.data.montage`) in one pass; a sub-image downsampled by
``r`` sits on the pyramid level of stride ``32 / r`` (r = 1, 2, 4, 8 -> P5, P4, P3, P2: the
"scale-aware assignment"), where it covers exactly one ``t x t`` tile, so its region is cut
out by a reshape. Each region's prediction must pick, among the target embeddings of the
other branch's full images, the one of its own source image::

    L = sum_X sum_i 2 T w_i CE(normalize(pred_i(z_X,i)) . normalize(t_X')^T / T, source ids)

with T = 1 and w = (1/2, 1/4, 1/8, 1/8) for levels 0..3, where ``t_X'`` is the target's neck
output at P5 of the other branch's full images.

Choices where the reference leaves room (documented in the report and :class:`MCL`):

* The neck runs only on the tiles the loss uses (the level matching each image's ratio),
  one neck call per level; the reference runs it on every level of every image, ~20x the
  neck FLOPs, which only changes the neck's BatchNorm statistics.
* The target network runs on the whole branch batch (full images and montages), as the
  reference does, so its BatchNorm statistics are the same; only P5 of the full images
  feeds the neck.
* In-batch negatives on one device (M = N); no cross-device all-gather, so a batch smaller
  than the reference's 4096 gathered targets has fewer negatives and an easier task.

The momentum target normalises with batch statistics and its EMA averages parameters only,
as the reference's (``add_teacher(..., batch_statistics=True)``).
"""

import keras
from keras import ops

from keras_pqcl.backbones.base import check_backbone
from keras_pqcl.backbones.fpn import FPN
from keras_pqcl.backend import num_replicas_in_sync
from keras_pqcl.heads.mcl_head import MCLNeck, MCLPredictor
from keras_pqcl.models.base import SelfSupervisedModel, clone_layer, require
from keras_pqcl.models.needs import Needs, constructor_arguments

#: Loss weight of each level i (r = 2**i): the reference's (1/2, 1/4, 1/8, 1/8).
LEVEL_WEIGHTS = (0.5, 0.25, 0.125, 0.125)


def region_tiles(feature_map, tile):
    """Cuts ``(B, H, W, C)`` into non-overlapping ``tile x tile`` regions.

    Returns ``(B * H/tile * W/tile, tile, tile, C)`` in image-major, then row-major order:
    the order of the montage slots (``montage_sources_r{r}``). This is MCL's region
    pooling; no RoIAlign is needed because each tile is exactly one sub-image.
    """
    _, h, w, c = feature_map.shape
    if h % tile or w % tile:
        raise ValueError(f"A {h}x{w} feature map does not split into {tile}x{tile} tiles.")
    x = ops.reshape(feature_map, (-1, h // tile, tile, w // tile, tile, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, rows, cols, y, x, C)
    return ops.reshape(x, (-1, tile, tile, c))


def contrastive_level_loss(predictions, targets, labels, temperature=1.0, weight=1.0):
    """``2 T w CE(normalize(p) normalize(t)^T / T, labels)``, averaged over the rows.

    Args:
        predictions: ``(R, D)`` online predictions (one per region).
        targets: ``(M, D)`` target embeddings (one per image of the other branch).
        labels: int ``(R,)``, the target row of each region's source image.
        temperature: T (1.0 in MCL).
        weight: the level's weight ``w_i``.

    Returns:
        ``(loss, positive_cosine)``: scalar float32 loss and the mean cosine between each
        prediction and its positive target.
    """
    p = ops.normalize(ops.cast(predictions, "float32"), axis=-1)
    t = ops.normalize(ops.cast(targets, "float32"), axis=-1)
    logits = ops.matmul(p, ops.transpose(t)) / temperature
    labels = ops.cast(labels, "int32")
    ce = ops.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    positive = ops.sum(logits * ops.one_hot(labels, ops.shape(t)[0], dtype=logits.dtype), axis=-1)
    return 2.0 * temperature * weight * ops.mean(ce), ops.mean(positive) * temperature


@keras.saving.register_keras_serializable(package="keras_pqcl")
class MCL(SelfSupervisedModel):
    """Multi-level contrastive learning on montages (online + momentum target network).

    Args:
        backbone: the online ResNet (``keras_pqcl.backbones.ResNet``, returning
            ``{"C2".."C5"}``); the target is a copy.
        fpn: put an FPN (P2..P5, BatchNorm, no activation; ``keras_pqcl.backbones.FPN``) on
            the backbone (True, the paper). False uses C5 only: level 0 (full images) only,
            so the batches must carry no montages (``MontageConfig(ratios=())``).
        fpn_channels: FPN width (256).
        neck_convs, neck_channels, hidden_dim, projection_dim: :class:`MCLNeck`
            (4 convs of 256, MLP 2048 -> 256).
        predictor_hidden_dim: :class:`MCLPredictor` hidden width (2048).
        temperature: T of the InfoNCE (1.0; not MoCo's 0.2).
        level_weights: loss weight of levels 0..3 ((1/2, 1/4, 1/8, 1/8)).
        teacher_momentum, teacher_momentum_end: EMA momentum, cosine 0.99 -> 1 over all
            steps (the reference's BYOL hook), applied after each optimizer step.

    Data (``fit``): dict batches from :func:`keras_pqcl.data.mcl_dataset`:
        ``full_images`` ``(N, 2, S, S, 3)``, and per montage ratio r in {2, 4, 8} present
        ``montages_r{r}`` ``(B_r, 2, S, S, 3)`` and ``montage_sources_r{r}``
        ``(r^2 B_r, 2)``. Axis 1 is the branch (q, k). ``S`` is a multiple of 32.

    Logs: ``loss``; ``level_0`` .. ``level_3`` (each level's weighted loss, both branches;
        levels 0-3 = P5, P4, P3, P2 = full images, 2x2, 4x4, 8x8 montages); ``pos_cos``
        (mean cosine of the level-0 predictions with their positives); ``teacher_momentum``,
        ``learning_rate``.

    Call: ``model(images)`` -> the online network's features, ``{"C2".."C5"}`` and (with
        the FPN) ``{"P2".."P5"}``.
    """

    loss_terms = ("level_0", "level_1", "level_2", "level_3")
    config_fields = (
        "fpn",
        "fpn_channels",
        "neck_convs",
        "neck_channels",
        "hidden_dim",
        "projection_dim",
        "predictor_hidden_dim",
        "temperature",
        "level_weights",
    )
    # No collapse_terms: each level is a cross-entropy over the batch's own targets (an
    # InfoNCE), not over prototypes, so no fixed ln K marks a collapse.

    @classmethod
    def needs(cls, **method_args):
        """A ResNet returning ``C2..C5`` (``C5`` only with ``fpn=False``); montage batches."""
        fpn = constructor_arguments(cls, method_args)["fpn"]
        maps = ("C2", "C3", "C4", "C5") if fpn else ("C5",)
        return Needs(backbone="resnet", feature_maps=maps, batches="montage")

    def __init__(
        self,
        backbone,
        fpn=True,
        fpn_channels=256,
        neck_convs=4,
        neck_channels=256,
        hidden_dim=2048,
        projection_dim=256,
        predictor_hidden_dim=2048,
        temperature=1.0,
        level_weights=LEVEL_WEIGHTS,
        teacher_momentum=0.99,
        teacher_momentum_end=1.0,
        **kwargs,
    ):
        check_backbone(backbone, type(self).needs(fpn=fpn), type(self).__name__)
        kwargs.setdefault("freeze_last_layer", 0)
        super().__init__(teacher_momentum=teacher_momentum, teacher_momentum_end=teacher_momentum_end, **kwargs)
        level_weights = tuple(float(w) for w in level_weights)
        if len(level_weights) != 4:
            raise ValueError(f"level_weights needs one weight per level 0..3, got {level_weights}.")
        self.fpn = bool(fpn)
        self.fpn_channels = int(fpn_channels)
        self.neck_convs = int(neck_convs)
        self.neck_channels = int(neck_channels)
        self.hidden_dim = int(hidden_dim)
        self.projection_dim = int(projection_dim)
        self.predictor_hidden_dim = int(predictor_hidden_dim)
        self.temperature = float(temperature)
        self.level_weights = level_weights

        if not backbone.built:
            backbone.build()
        self.student_backbone = backbone
        self.teacher_backbone = clone_layer(backbone, name="teacher_backbone")
        channels = dict(backbone.out_channels)
        if self.fpn:
            shapes = {k: (None, None, None, c) for k, c in channels.items()}
            self.student_fpn = FPN(self.fpn_channels, name="student_fpn")
            self.student_fpn.build(shapes)
            self.teacher_fpn = clone_layer(self.student_fpn, shapes, name="teacher_fpn")
            neck_in = self.fpn_channels
        else:
            neck_in = channels["C5"]
        neck_shape = (None, None, None, neck_in)
        self.student_neck = MCLNeck(
            self.neck_convs, self.neck_channels, self.hidden_dim, self.projection_dim, name="student_neck"
        )
        self.student_neck.build(neck_shape)
        self.teacher_neck = clone_layer(self.student_neck, neck_shape, name="teacher_neck")
        self.predictors = []
        for i in range(4 if self.fpn else 1):
            head = MCLPredictor(self.predictor_hidden_dim, self.projection_dim, name=f"predictor_{i}")
            head.build((None, self.projection_dim))
            self.predictors.append(head)

        for role in ("backbone", "fpn", "neck") if self.fpn else ("backbone", "neck"):
            self.add_teacher(getattr(self, f"teacher_{role}"), getattr(self, f"student_{role}"), batch_statistics=True)
        # The ResNet builds its weighted layers in __init__ but leaves its zero-padding
        # layers to their first call; Keras' fit on JAX and torch refuses a model with any
        # unbuilt layer (and would build it from the dict batch). They hold no state.
        for layer in self._flatten_layers(include_self=False):
            if not layer.built and not layer.weights:
                layer.build((None, None, None, None))
        self.built = True

    # ------------------------------------------------------------------ network
    def _pyramid(self, backbone, fpn, images, training):
        features = backbone(images, training=training)
        if fpn is None:
            return {"P5": features["C5"]}
        return fpn(features, training=training)

    def call(self, images, training=False):
        features = dict(self.student_backbone(images, training=training))
        if self.fpn:
            features.update(self.student_fpn(features, training=training))
        return features

    def _levels(self, data):
        """``[(level, count, labels or None, inputs)]`` of one batch, level 0 first."""
        full = require(
            data,
            "full_images",
            "MCL",
            "Batches are dicts with 'full_images' (N, 2, S, S, 3) and the montages; use keras_pqcl.data.mcl_dataset.",
        )
        ratios = sorted(int(k[len("montages_r") :]) for k in data if k.startswith("montages_r"))
        if ratios and not self.fpn:
            raise ValueError(
                f"MCL(fpn=False) uses C5 only, so it cannot place montages of ratios {ratios}; "
                "build the data with MontageConfig(ratios=()) or use fpn=True."
            )
        levels = [(0, full.shape[0], None, full)]
        for r in ratios:
            if r not in (2, 4, 8):
                raise ValueError(f"Montage ratio {r} has no pyramid level (2, 4, 8 -> P4, P3, P2).")
            montages = data[f"montages_r{r}"]
            sources = require(data, f"montage_sources_r{r}", "MCL", "Use keras_pqcl.data.mcl_dataset.")
            levels.append(({2: 1, 4: 2, 8: 3}[r], montages.shape[0], sources, montages))
        size = full.shape[2]
        if size % 32:
            raise ValueError(f"MCL needs images whose side is a multiple of 32, got {size}.")
        return levels, size // 32

    def ssl_forward(self, data, step, training=True):
        if num_replicas_in_sync() > 1:
            # Montages mix images of the whole batch: a replica's slice of them would hold
            # slots of images another replica holds.
            raise ValueError(
                "MCL does not run under a multi-replica tf.distribute strategy or torch.distributed "
                "(montages are built from the whole batch). Train on one device, or with JAX "
                "keras.distribution.DataParallel and a batch whose montage counts divide by the devices."
            )
        levels, tile = self._levels(data)
        n = levels[0][1]
        teacher_fpn = self.teacher_fpn if self.fpn else None
        student_fpn = self.student_fpn if self.fpn else None

        predictions, targets = [], []
        for branch in (0, 1):
            images = ops.concatenate([lvl[3][:, branch] for lvl in levels], axis=0)

            # Target: the whole branch batch (its BN statistics are the reference's); only
            # P5 of the full images is embedded.
            t_p5 = self._pyramid(self.teacher_backbone, teacher_fpn, images, training)["P5"][:n]
            t = self.teacher_neck(region_tiles(t_p5, tile), training=training)
            targets.append(ops.stop_gradient(t))

            online = self._pyramid(self.student_backbone, student_fpn, images, training)
            per_level, start = [], 0
            for level, count, _, _ in levels:
                fmap = online[f"P{5 - level}"][start : start + count]
                z = self.student_neck(region_tiles(fmap, tile), training=training)
                per_level.append(self.predictors[level](z, training=training))
                start += count
            predictions.append(per_level)

        loss = 0.0
        logs = {}
        pos_cos = []
        own = ops.arange(n, dtype="int32")
        for branch in (0, 1):
            for (level, _, sources, _), pred in zip(levels, predictions[branch]):
                labels = own if sources is None else sources[:, branch]
                term, cos = contrastive_level_loss(
                    pred, targets[1 - branch], labels, self.temperature, self.level_weights[level]
                )
                name = f"level_{level}"
                logs[name] = logs[name] + term if name in logs else term
                loss = loss + term
                if level == 0:
                    pos_cos.append(cos)
        logs["pos_cos"] = (pos_cos[0] + pos_cos[1]) / 2.0
        logs.update(self.schedules.values(step))
        return loss, logs
