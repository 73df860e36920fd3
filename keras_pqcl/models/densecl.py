"""DenseCL: dense contrastive learning (Wang, Zhang, Shen, Kong, Li; CVPR 2021).

MoCo-v2 plus a dense term: a query encoder (ResNet + global and dense heads) and its
EMA copy, the key encoder, see two views of each image. The global InfoNCE contrasts pooled
embeddings; the dense InfoNCE matches every query position to the key position whose *backbone*
feature is most similar (argmax of cosine similarity) and contrasts it against a queue of
image-level pooled dense keys. ``L = (1 - lambda) L_global + lambda L_dense``, lambda = 0.5.

Key encoder. As the reference, it runs in train mode without gradients, so its BatchNorm
normalises with the key batch's statistics, and the EMA (a constant 0.999) averages
parameters only, not BatchNorm buffers: ``add_teacher(..., batch_statistics=True)``. The
reference updates it at the start of a step; the shared train step does so right after the
optimizer update, which gives the same sequence of key weights.

Shuffle BN. MoCo permutes the global key batch across GPUs so that the
key of image n is normalised with other images than its query. The equivalent here is split
BatchNorm: build the backbone with ``bn_splits=G`` (every BN then normalises G groups of the
batch separately, G GPUs' worth; 8 for batch 256 = 8 x 32 as in the paper) and keep
``shuffle_bn=True``: the key batch is randomly permuted before the key encoder and the key
outputs un-permuted after, so query and key groups differ. With ``bn_splits=1`` a permutation
cannot change a whole-batch BN, so none is drawn. Under a multi-replica ``tf.distribute`` or
``torch.distributed`` run each replica normalises its own share (set ``bn_splits`` per replica);
there is no cross-replica key shuffle. Under JAX GSPMD, BN statistics are global unless split.
"""

import keras
from keras import ops

from keras_pqcl.backbones.base import check_backbone
from keras_pqcl.heads.densecl_head import DenseCLDenseHead, DenseCLGlobalHead
from keras_pqcl.losses.info_nce import InfoNCE
from keras_pqcl.models.base import SelfSupervisedModel, clone_layer, require
from keras_pqcl.models.needs import Needs, constructor_arguments

MOMENTUM_SCHEDULES = ("constant", "cosine")


def dense_correspondence(query_features, key_features):
    """For every query position, the key position of highest cosine similarity.

    Args:
        query_features: ``(B, N, C)`` backbone features of the query view.
        key_features: ``(B, M, C)`` backbone features of the key view.

    Returns:
        int ``(B, N)``: ``argmax_j cos(query[b, i], key[b, j])``. Many-to-one, no threshold.
    """
    q = ops.normalize(ops.cast(query_features, "float32"), axis=-1)
    k = ops.normalize(ops.cast(key_features, "float32"), axis=-1)
    similarity = ops.einsum("bic,bjc->bij", q, k)
    return ops.argmax(similarity, axis=-1)


def gather_positions(values, indices):
    """``values[b, indices[b, i]]`` for ``values`` ``(B, M, D)`` and ``indices`` ``(B, N)``,
    as a one-hot contraction (the same arithmetic on every backend, XLA-friendly)."""
    onehot = ops.one_hot(indices, values.shape[1], dtype=values.dtype)
    return ops.einsum("bij,bjd->bid", onehot, values)


@keras.saving.register_keras_serializable(package="keras_pqcl")
class DenseCL(SelfSupervisedModel):
    """Query encoder + EMA key encoder, global and dense heads, two queues, two InfoNCE terms.

    Args:
        backbone: the query backbone, a :class:`~keras_pqcl.backbones.ResNet` (or any
            backbone of the contract in :mod:`keras_pqcl.backbones.base` whose call returns a
            dict with ``feature``, listed in ``out_channels``); the key backbone is a copy built
            from its config.
        feature: backbone output the heads and the matching read (``"C5"``).
        hidden_dim: hidden width of both heads (2048).
        projection_dim: embedding width (128).
        queue_size: negatives per term ``K`` (65,536).
        temperature: tau of both terms (0.2).
        loss_lambda: weight of the dense term (0.5).
        lambda_start_step: optimizer steps with lambda = 0 before switching to ``loss_lambda``
            (0 = off; the reference's optional ``DenseCLWarmupHook`` uses 1000). A hard switch,
            as in the reference, not a ramp.
        shuffle_bn: permute the key batch around the key encoder when the backbone uses split
            BatchNorm (True).
        momentum_schedule: ``"constant"`` (DenseCL: ``teacher_momentum`` throughout) or
            ``"cosine"`` (from ``teacher_momentum`` to ``teacher_momentum_end``).
        teacher_momentum: key-encoder EMA momentum (0.999).
        teacher_momentum_end: end of the cosine schedule (defaults to ``teacher_momentum``).
        seed: seed of the key-batch permutation.

    Data: batches are dicts with ``"global_crops"`` ``(B, 2, H, W, 3)``: view 0 is the query,
    view 1 the key (see :func:`keras_pqcl.data.views.densecl_crops`).

    Logs: ``loss``, ``global`` and ``dense`` (the two InfoNCE terms), ``loss_lambda``,
    ``teacher_momentum``, ``learning_rate``, ``weight_decay`` (if the optimizer has one).

    The trained network for transfer is ``query_backbone`` (``student_backbone``).
    """

    loss_terms = ("global", "dense")
    config_fields = (
        "feature",
        "hidden_dim",
        "projection_dim",
        "queue_size",
        "temperature",
        "loss_lambda",
        "lambda_start_step",
        "shuffle_bn",
        "momentum_schedule",
        "seed",
    )
    # The query encoder is the trained network; the key encoder only lags behind it.
    transfer = "student"
    # No collapse_terms: both terms are InfoNCE against a queue of keys, not cross-entropies
    # over prototypes, so no fixed ln K marks a collapse.

    @classmethod
    def needs(cls, **method_args):
        """A ResNet returning ``feature`` (``"C5"``); two-view multi-crop batches."""
        return Needs(backbone="resnet", feature_maps=(constructor_arguments(cls, method_args)["feature"],))

    def __init__(
        self,
        backbone,
        feature="C5",
        hidden_dim=2048,
        projection_dim=128,
        queue_size=65536,
        temperature=0.2,
        loss_lambda=0.5,
        lambda_start_step=0,
        shuffle_bn=True,
        momentum_schedule="constant",
        teacher_momentum=0.999,
        teacher_momentum_end=None,
        seed=None,
        **kwargs,
    ):
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {momentum_schedule!r}.")
        if not 0.0 <= float(loss_lambda) <= 1.0:
            raise ValueError(f"loss_lambda must lie in [0, 1], got {loss_lambda}.")
        if teacher_momentum_end is None or momentum_schedule == "constant":
            teacher_momentum_end = teacher_momentum  # a cosine between equal ends is constant
        kwargs.setdefault("freeze_last_layer", 0)
        super().__init__(teacher_momentum=teacher_momentum, teacher_momentum_end=teacher_momentum_end, **kwargs)
        self.feature = feature
        self.hidden_dim = int(hidden_dim)
        self.projection_dim = int(projection_dim)
        self.queue_size = int(queue_size)
        self.temperature = float(temperature)
        self.loss_lambda = float(loss_lambda)
        self.lambda_start_step = int(lambda_start_step)
        self.shuffle_bn = bool(shuffle_bn)
        self.momentum_schedule = momentum_schedule
        self.seed = seed

        check_backbone(backbone, type(self).needs(feature=feature), type(self).__name__)
        channels = dict(backbone.out_channels)[feature]
        if not backbone.built:
            backbone.build()
        self.query_backbone = backbone
        self.key_backbone = clone_layer(backbone, name="key_backbone")
        heads = dict(hidden_dim=self.hidden_dim, out_dim=self.projection_dim)
        shape = (None, None, None, channels)
        self.query_global_head = DenseCLGlobalHead(name="query_global_head", **heads)
        self.query_dense_head = DenseCLDenseHead(name="query_dense_head", **heads)
        self.key_global_head = DenseCLGlobalHead(name="key_global_head", **heads)
        self.key_dense_head = DenseCLDenseHead(name="key_dense_head", **heads)
        for head in (self.query_global_head, self.query_dense_head, self.key_global_head, self.key_dense_head):
            head.build(shape)
        for key, query in (
            (self.key_backbone, self.query_backbone),
            (self.key_global_head, self.query_global_head),
            (self.key_dense_head, self.query_dense_head),
        ):
            self.add_teacher(key, query, batch_statistics=True)

        loss = dict(temperature=self.temperature, queue_size=self.queue_size, dim=self.projection_dim)
        self.global_loss = InfoNCE(name="global_loss", **loss)
        self.dense_loss = InfoNCE(name="dense_loss", **loss)
        self.seed_generator = keras.random.SeedGenerator(seed, name="shuffle_seed")
        self.built = True

    # ------------------------------------------------------------ key encoder
    @property
    def student_backbone(self):
        """The query backbone: the network to transfer (name used by the training runner)."""
        return self.query_backbone

    @property
    def teacher_backbone(self):
        """The key (EMA) backbone."""
        return self.key_backbone

    def loss_lambda_at(self, step):
        """lambda, or 0 before ``lambda_start_step`` (the optional warm-up switch)."""
        lam = ops.convert_to_tensor(self.loss_lambda, "float32")
        if not self.lambda_start_step:
            return lam
        return ops.where(ops.cast(step, "float32") < float(self.lambda_start_step), 0.0, lam)

    # ---------------------------------------------------------------- forward
    def encode(self, images, backbone, global_head, dense_head, training=False):
        """``(B, H, W, 3)`` -> backbone features ``(B, h*w, C)``, global ``(B, D)``, dense
        ``(B, h*w, D)`` and pooled dense ``(B, D)`` embeddings, none normalised."""
        features = backbone(images, training=training)[self.feature]
        g = global_head(features)
        d, pooled = dense_head(features)
        batch = ops.shape(features)[0]
        flat = ops.reshape(features, (batch, -1, features.shape[-1]))
        return flat, g, ops.reshape(d, (batch, -1, d.shape[-1])), pooled

    def _uses_split_bn(self):
        return int(getattr(self.query_backbone, "bn_splits", 1)) > 1

    def encode_keys(self, images, training=True):
        """Key-encoder outputs without gradient, with the shuffle-BN permutation when the
        backbone splits its BatchNorm."""
        shuffle = self.shuffle_bn and training and self._uses_split_bn()
        if shuffle:
            perm = keras.random.shuffle(ops.arange(ops.shape(images)[0]), seed=self.seed_generator)
            images = ops.take(images, perm, axis=0)
        outputs = self.encode(images, self.key_backbone, self.key_global_head, self.key_dense_head, training)
        if shuffle:
            inverse = ops.argsort(perm)
            outputs = tuple(ops.take(x, inverse, axis=0) for x in outputs)
        return tuple(ops.stop_gradient(x) for x in outputs)

    def ssl_forward(self, data, step, training=True):
        crops = require(
            data,
            "global_crops",
            "DenseCL",
            "Batches are dicts with 'global_crops' (B, 2, H, W, 3); use keras_pqcl.data.pretrain_dataset "
            "with crops=keras_pqcl.data.views.densecl_crops().",
        )
        if len(crops.shape) != 5 or crops.shape[1] != 2:
            raise ValueError(
                f"DenseCL needs two views per image, 'global_crops' of shape (B, 2, H, W, 3); got "
                f"{tuple(crops.shape)}. Use MultiCropConfig(n_global=2, n_local=0)."
            )
        key_feat, key_global, key_dense, key_pooled = self.encode_keys(crops[:, 1], training=training)
        query_feat, query_global, query_dense, _ = self.encode(
            crops[:, 0], self.query_backbone, self.query_global_head, self.query_dense_head, training
        )

        q = ops.normalize(ops.cast(query_global, "float32"), axis=-1)
        k = ops.normalize(ops.cast(key_global, "float32"), axis=-1)
        loss_global = self.global_loss(q, k)

        # Matching on backbone features; no gradient through the argmax.
        match = dense_correspondence(ops.stop_gradient(query_feat), key_feat)
        q_dense = ops.normalize(ops.cast(query_dense, "float32"), axis=-1)
        k_dense = ops.normalize(ops.cast(key_dense, "float32"), axis=-1)
        positives = gather_positions(k_dense, match)
        dim = self.projection_dim
        loss_dense = self.dense_loss(ops.reshape(q_dense, (-1, dim)), ops.reshape(positives, (-1, dim)))

        lam = self.loss_lambda_at(step)
        loss = (1.0 - lam) * loss_global + lam * loss_dense

        if training:  # after the logits: this batch's keys are negatives from the next step on
            self.global_loss.enqueue(k)
            self.dense_loss.enqueue(ops.normalize(ops.cast(key_pooled, "float32"), axis=-1))

        logs = self.schedules.values(step)
        logs.update({"global": loss_global, "dense": loss_dense, "loss_lambda": lam})
        return loss, logs

    def call(self, images, training=False):
        """Query-backbone features ``(batch, C)``: global average of ``feature``."""
        return ops.mean(self.query_backbone(images, training=training)[self.feature], axis=(1, 2))
