"""One self-distillation model for DINO, iBOT, PQCL and ADCLR: a student ViT with a
projection head, their EMA teacher copies, and a list of loss terms.

The model runs one teacher and one student pass over the global views per step, computing
only what its terms declare they read (:mod:`keras_pqcl.models.terms`); each term turns that
into its loss and logs. DINO is ``[CLS]``, iBOT ``[CLS, masked patches]``, PQCL
``[CLS, (masked patches,) positional queries]``, ADCLR ``[CLS, (masked patches,) query
crops]``, and any of them can take DINOv2's KoLeo (``extra_terms=["koleo"]``). This is the
design of dinov2's meta-architecture, where the methods are loss terms switched on.
"""

import inspect
import types

import keras
from keras import ops

from keras_pqcl.backbones.base import check_backbone
from keras_pqcl.heads.dino_head import DINOHead
from keras_pqcl.heads.ibot_head import iBOTHead
from keras_pqcl.models.base import SelfSupervisedModel, clone_layer, crop_major, crops_along_tokens
from keras_pqcl.models.needs import combine, constructor_arguments
from keras_pqcl.models.terms import TERMS, CLSDistillation, MaskedPatchDistillation, StepOutputs, Term
from keras_pqcl.schedules import EpochRamp

GLOBAL_HINT = (
    "Batches are dicts with 'global_crops' (B, G, H, W, 3) and optionally 'local_crops'; use "
    "keras_pqcl.data.pretrain_dataset."
)

#: the head's arguments; the rest of a method's arguments shape its terms.
HEAD_ARGS = (
    "out_dim",
    "patch_out_dim",
    "shared_head",
    "hidden_dim",
    "bottleneck_dim",
    "head_layers",
    "norm_last_layer",
)


def resolve_terms(terms, out_dim=None):
    """Term instances from instances, registered names (:data:`~keras_pqcl.models.terms.TERMS`,
    built with the model's ``out_dim`` where they take one) or serialised configs."""
    resolved = []
    for term in terms or ():
        if isinstance(term, str):
            if term not in TERMS:
                raise ValueError(f"Unknown loss term {term!r}; registered: {sorted(TERMS)}.")
            cls = TERMS[term]
            takes = "out_dim" in inspect.signature(cls.__init__).parameters
            term = cls(out_dim) if takes else cls()
        elif isinstance(term, dict):
            term = keras.saving.deserialize_keras_object(term)
        if not isinstance(term, Term):
            raise TypeError(f"A loss term must be a keras_pqcl.models.terms.Term, got {type(term).__name__}.")
        resolved.append(term)
    return resolved


def encode(backbone, head, images, masks=None, queries=None, patches=True, training=False):
    """Backbone, then head on its tokens with one head call for all of them.

    Args:
        images: ``(B, H, W, 3)``; masks: optional bool ``(B, N)``; queries: optional
            ``(B, T, D)`` query tokens (they need a shared head: one last layer for every
            token); patches: also return the patch logits (skipped when no term reads them).

    Returns:
        dict: ``"cls"`` ``(B, K)``, ``"cls_features"`` ``(B, D)`` (before the head), and
        ``"patches"`` ``(B, N, K_p)`` / ``"queries"`` ``(B, T, K)`` when asked for.
    """
    features = backbone(images, masks=masks, queries=queries, training=training)
    out = {"cls_features": features["cls"]}
    if not patches and queries is None:
        out["cls"] = head.token_logits(features["cls"])
        return out
    n = features["patches"].shape[1] if patches else 0
    parts = [features["cls"][:, None]] + ([features["patches"]] if patches else [])
    parts += [features["queries"]] if queries is not None else []
    tokens = ops.concatenate(parts, axis=1)
    if head.last_layer2 is not None:
        if queries is not None:
            raise ValueError("query tokens need a shared head (shared_head=True).")
        out["cls"], out["patches"] = head(tokens)
        return out
    logits = head.token_logits(tokens)
    out["cls"] = logits[:, 0]
    if patches:
        out["patches"] = logits[:, 1 : 1 + n]
    if queries is not None:
        out["queries"] = logits[:, 1 + n :]
    return out


@keras.saving.register_keras_serializable(package="keras_pqcl")
class SelfDistillation(SelfSupervisedModel):
    """Student ViT + head, EMA teacher copies, and loss terms.

    Args:
        backbone: the student ViT; the teacher is a copy with stochastic depth off. It must
            meet what the terms need (mask token, position table), checked here.
        terms: :class:`~keras_pqcl.models.terms.Term` instances (or registered names). The
            loss is ``sum_i term_i.weight * term_i``.
        out_dim: prototypes ``K`` of the head's CLS (and shared) last layer.
        patch_out_dim, shared_head: the patch tokens' prototypes and whether they share the
            CLS last layer (None and True: one layer for every token, as the published iBOT
            and PQCL recipes). A DINO head (no patch layer) is built when no term reads patch
            or query tokens.
        hidden_dim, bottleneck_dim, head_layers: head MLP (2048, 256, 3).
        norm_last_layer: freeze the student's weight-norm gain at 1 (True).
        use_bn_in_head: BatchNorm after the head's hidden layers (False, as the reference's
            ViT recipes).
        extra_terms: more terms (names or instances) appended to ``terms``, e.g.
            ``["koleo"]``.
        teacher_momentum, teacher_momentum_end, freeze_last_layer: see
            :class:`~keras_pqcl.models.SelfSupervisedModel`.

    Data: dicts with ``"global_crops"`` ``(B, G, H, W, 3)``, ``"local_crops"``
        ``(B, n, h, w, 3)`` and what the terms need (``"global_masks"``, ``"query_coords"``).

    Logs: ``loss``, each term's log and monitors (epoch means), each term's teacher
        temperature, ``teacher_momentum``, ``learning_rate``, ``weight_decay``.
    """

    def __init__(
        self,
        backbone,
        terms=None,
        out_dim=65536,
        patch_out_dim=None,
        shared_head=True,
        hidden_dim=2048,
        bottleneck_dim=256,
        head_layers=3,
        norm_last_layer=True,
        use_bn_in_head=False,
        extra_terms=(),
        _arguments=None,
        **kwargs,
    ):
        extra = resolve_terms(extra_terms, out_dim)
        terms = resolve_terms(terms, out_dim) + extra
        for role in ("student_masks", "query_tokens"):
            givers = [t.name for t in terms if getattr(type(t), role) is not getattr(Term, role)]
            if len(givers) > 1:
                raise ValueError(f"Only one loss term may provide {role.replace('_', ' ')}; got {givers}.")
        needs = combine(t.needs() for t in terms)
        reasons = {k: v for t in terms for k, v in t.backbone_reasons.items()}
        check_backbone(backbone, needs, type(self).__name__, reasons)
        super().__init__(**kwargs)
        self._arguments = _arguments
        self.head_args = {name: value for name, value in locals().items() if name in HEAD_ARGS}
        self.out_dim, self.use_bn_in_head = out_dim, use_bn_in_head
        self._n_extra = len(extra)

        self.student_backbone = backbone
        if not backbone.built:
            backbone.build()
        self.teacher_backbone = clone_layer(backbone, drop_path_rate=0.0, name="teacher_backbone")
        if backbone.has_mask_token and not needs.mask_token:
            # No term reads it: frozen, it draws no "gradients do not exist" warnings.
            backbone.mask_token.trainable = False
        tokens = any(
            t.student_patches or t.teacher_patches or type(t).query_tokens is not Term.query_tokens for t in terms
        )
        args = dict(
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=head_layers,
            use_bn=use_bn_in_head,
        )
        if tokens:
            head, args = iBOTHead, dict(args, patch_out_dim=patch_out_dim or out_dim, shared_head=shared_head)
        else:
            head = DINOHead
        self.student_head = head(norm_last_layer=norm_last_layer, name="student_head", **args)
        self.teacher_head = head(norm_last_layer=True, name="teacher_head", **args)
        dim = backbone.embed_dim
        self.student_head.build((None, dim))
        self.teacher_head.build((None, dim))
        self.add_teacher(self.teacher_backbone, self.student_backbone)
        self.add_teacher(self.teacher_head, self.student_head)
        self.terms = terms
        self.schedules.temperatures = {name: ramp for t in terms for name, ramp in t.schedules().items()}
        self.add_trackers(self.loss_terms)
        self.built = True

    # ----------------------------------------------------------- declarations
    @classmethod
    def needs(cls, **method_args):
        """What the terms built from ``method_args`` (others at their defaults) need."""
        return combine(t.needs() for t in cls._terms_of(method_args))

    @classmethod
    def _terms_of(cls, method_args):
        if cls.make_terms is SelfDistillation.make_terms:
            terms = method_args.get("terms", ())
        else:
            terms = cls.make_terms(types.SimpleNamespace(**constructor_arguments(cls, method_args)))
        out_dim = method_args.get("out_dim") or 65536  # what a term built by name gets; needs ignore it
        return resolve_terms(terms, out_dim) + resolve_terms(method_args.get("extra_terms", ()), out_dim)

    @staticmethod
    def make_terms(args):
        """A method's terms from its constructor arguments (a namespace); the generic model
        takes ``terms`` directly."""
        raise NotImplementedError

    @property
    def loss_terms(self):
        return tuple(name for t in self.terms for name in (t.log_name,) + tuple(t.monitors))

    @property
    def collapse_terms(self):
        return {t.log_name: t.prototypes for t in self.terms if t.prototypes}

    def term(self, log_name):
        """The term logged as ``log_name`` (``"cls"``, ``"mim"``, ``"query"``, ``"koleo"``)."""
        for t in self.terms:
            if t.log_name == log_name:
                return t
        raise KeyError(f"{type(self).__name__} has no term {log_name!r}; it has {[t.log_name for t in self.terms]}.")

    def frozen_variables(self):
        return [v for layer in self.student_head.last_layers for v in layer.trainable_variables]

    # ------------------------------------------------------------------- step
    def call(self, images, training=False):
        """Student CLS features ``(batch, D)`` of ``images``."""
        return self.student_backbone(images, training=training)["cls"]

    def ssl_forward(self, data, step, training=True):
        crops = self.require(data, "global_crops", GLOBAL_HINT)
        out = StepOutputs(data, step, crops.shape[1], ops.shape(crops)[0])
        images = crop_major(crops)
        student_queries = teacher_queries = None
        for term in self.terms:
            masks = term.student_masks(self, out)
            out.masks = out.masks if masks is None else masks
            queries = term.query_tokens(self, out)
            if queries is not None:
                student_queries, teacher_queries = queries

        out.teacher = encode(
            self.teacher_backbone,
            self.teacher_head,
            images,
            queries=teacher_queries,
            patches=any(t.teacher_patches for t in self.terms),
        )
        out.teacher = {k: ops.stop_gradient(v) for k, v in out.teacher.items()}
        if any(t.teacher_local_patches for t in self.terms):
            out.teacher_local_patches = self.teacher_local_patches(data["local_crops"])

        local = data.get("local_crops") if any(t.local_cls for t in self.terms) else None
        local = local if local is not None and local.shape[1] else None
        patches = any(t.student_patches for t in self.terms)
        if patches or student_queries is not None:
            out.student = encode(
                self.student_backbone,
                self.student_head,
                images,
                masks=out.masks,
                queries=student_queries,
                patches=patches,
                training=training,
            )
            if local is not None:
                features = self.student_backbone(crop_major(local), training=training)
                local_cls = self.student_head.token_logits(features["cls"])
                out.student_crops_cls = ops.concatenate([out.student["cls"], local_cls], axis=0)
        else:
            # CLS only (DINO): same-size crops through the backbone together, one head call
            # for every crop, so a BatchNorm in the head sees all of them.
            features = [self.student_backbone(images, masks=out.masks, training=training)["cls"]]
            if local is not None:
                features.append(self.student_backbone(crop_major(local), training=training)["cls"])
            logits = self.student_head.token_logits(ops.concatenate(features, axis=0))
            n = ops.shape(features[0])[0]
            out.student = {"cls": logits[:n], "cls_features": features[0]}
            if local is not None:
                out.student_crops_cls = logits  # already every crop, globals first: no split and re-join

        values = self.schedules.values(step)
        loss, logs = 0.0, dict(values)
        for term in self.terms:
            value, term_logs = term.loss(out, values)
            loss = loss + term.weight * value
            logs.update(term_logs)
        return loss, logs

    def teacher_local_patches(self, local_crops):
        """Teacher logits of the local crops' patch tokens ``(B, n * L², K)``, each crop
        encoded on its own, crops concatenated along the tokens (PQCL's query targets)."""
        features = self.teacher_backbone(crop_major(local_crops), training=False)
        logits = self.teacher_head.token_logits(features["patches"])  # (n B, L², K)
        return crops_along_tokens(ops.stop_gradient(logits), local_crops.shape[1])

    # ---------------------------------------------------------------- config
    def get_config(self):
        config = super().get_config()
        split = len(self.terms) - self._n_extra
        config.update(use_bn_in_head=self.use_bn_in_head, extra_terms=_serialize(self.terms[split:]))
        if self._arguments is not None:
            config.update(self._arguments)
        else:
            config.update(self.head_args, terms=_serialize(self.terms[:split]))
        return config


def _serialize(terms):
    return [keras.saving.serialize_keras_object(t) for t in terms]


class NamedMethod(SelfDistillation):
    """Base of the named methods (:class:`DINO`, :class:`IBOT`, :class:`PQCL`,
    :class:`ADCLR`): a constructor with the paper's arguments and defaults, and
    :meth:`make_terms` turning them into terms. Nothing else differs."""

    def _setup(self, arguments, kwargs):
        """Call from ``__init__`` with ``locals()`` and the extra keyword arguments."""
        args = {k: v for k, v in arguments.items() if k not in ("self", "backbone", "kwargs", "__class__")}
        head = {k: v for k, v in args.items() if k in HEAD_ARGS}
        SelfDistillation.__init__(
            self,
            arguments["backbone"],
            terms=self.make_terms(types.SimpleNamespace(**args)),
            _arguments=args,
            **head,
            **kwargs,
        )


def ramp(args, prefix, start_epoch=0):
    """The teacher temperature ``<prefix>`` of a method's arguments as an
    :class:`~keras_pqcl.schedules.EpochRamp`: ``warmup_<prefix>`` -> ``<prefix>`` over
    ``warmup_teacher_temp_epochs``."""
    return EpochRamp(
        getattr(args, "warmup_" + prefix), getattr(args, prefix), args.warmup_teacher_temp_epochs, start_epoch
    )


BASES = ("ibot", "dino")


def base_terms(args, base, local_crops=True):
    """A named method's CLS term and, for ``base="ibot"``, its masked-patch term (``K_p`` =
    ``patch_out_dim`` or ``out_dim``), from its arguments ``args``; weights ``lambda1`` and
    ``lambda2`` where it has them, else 1."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}.")
    temps = (args.student_temp, ramp(args, "teacher_temp"), args.center_momentum)
    weight = getattr(args, "lambda1", 1.0)
    terms = [CLSDistillation(args.out_dim, *temps, local_crops=local_crops, weight=weight)]
    if base == "ibot":
        terms.append(
            MaskedPatchDistillation(
                getattr(args, "patch_out_dim", None) or args.out_dim,
                args.student_temp,
                ramp(args, "teacher_patch_temp", args.pred_start_epoch),
                args.center_momentum,
                start_epoch=args.pred_start_epoch,
                weight=args.lambda2,
            )
        )
    return terms
