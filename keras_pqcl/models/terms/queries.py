"""Query tokens appended to the student's global views: PQCL's positional queries and
ADCLR's query crops.

Both append ``T`` query tokens to every global view; the queries read the view's tokens and
never the reverse, so the image tokens' outputs are those of the view alone. The head maps
the queries' outputs to ``K`` logits with the CLS token's last layer, and
:class:`~keras_pqcl.losses.QueryLoss` (its own center ``(1, 1, K)`` and temperature) compares
them with the teacher's targets.
"""

import keras
from keras import ops

from keras_pqcl.layers.pos_embed import sample_table, sincos_embedding
from keras_pqcl.losses.query_loss import QueryLoss
from keras_pqcl.models.base import crop_major, crops_along_tokens
from keras_pqcl.models.needs import Needs
from keras_pqcl.models.terms.base import DistillationTerm

QUERY_HINT = (
    "Build the dataset with pretrain_dataset(..., queries=keras_pqcl.data.QueryConfig(patch_size=p)), "
    "p = the backbone's patch size, and MultiCropConfig(n_local >= 1)."
)
CROPS_HINT = (
    "The query crops are the pipeline's local crops: build the dataset with pretrain_dataset(..., "
    "crops=MultiCropConfig(n_local >= 1, local_size = a multiple of the backbone's patch size))."
)
GLOBAL_POSITION_HINT = (
    "query_position='global' places each query at its patch's position in every global view: build the dataset "
    "with pretrain_dataset(..., queries=keras_pqcl.data.QueryConfig(patch_size=p)), p = the backbone's patch "
    "size, or use query_position='crop' (no coordinates needed)."
)


def query_positions(model, data, hint, code="sincos"):
    """Position codes ``(G * B, T, D)``, view-major, of where each local-crop patch lies in each
    global view (the batch's ``query_coords`` ``(B, G, n, L*L, 2)``), checked against the
    crops and the backbone.

    ``code="sincos"``: the sin-cos code of that place (PQCL), which equals the image tokens'
    code only if the backbone's table is the fixed sin-cos one made for the global crops.
    ``"table"``: the backbone's own table, resampled to the global view's grid as for its image
    tokens, read there bilinearly (any table, e.g. DINOv2's learned one).
    """
    backbone, global_crops, local_crops = model.student_backbone, data["global_crops"], data["local_crops"]
    p, dim = backbone.patch_size, backbone.embed_dim
    n_global, n_local = global_crops.shape[1], local_crops.shape[1]
    per_crop = (local_crops.shape[2] // p) * (local_crops.shape[3] // p)
    if code == "sincos" and (
        global_crops.shape[2] != global_crops.shape[3] or global_crops.shape[2] // p != backbone.grid_size
    ):
        raise ValueError(
            f"query positions are sin-cos codes on the global view's patch grid, so the backbone's table must be "
            f"made for the global crops: got {global_crops.shape[2]}x{global_crops.shape[3]}-px global crops and "
            f"image_size={backbone.image_size}; build the backbone with image_size={global_crops.shape[2]}."
        )
    coords = model.require(data, "query_coords", hint)
    expected = (n_global, n_local, per_crop, 2)
    if tuple(coords.shape[1:]) != expected:
        raise ValueError(
            f"query_coords has shape {tuple(coords.shape)}, expected (B, {', '.join(map(str, expected))}) for "
            f"{n_global} global views and {n_local} local crops of {local_crops.shape[2]} px with patch size "
            f"{p}; set QueryConfig(patch_size={p})."
        )
    coords = crop_major(ops.reshape(coords, (-1, n_global, n_local * per_crop, 2)))
    if code == "sincos":
        return sincos_embedding(coords, dim)
    grid = (global_crops.shape[2] // p, global_crops.shape[3] // p)
    table = ops.reshape(backbone.position_embedding(grid)[0, 1:], (*grid, dim))
    return sample_table(table, coords)


def local_crops_of(model, data, hint):
    """The batch's local crops ``(B, n, s, s, 3)``, at least one."""
    local_crops = model.require(data, "local_crops", hint)
    if not local_crops.shape[1]:
        raise ValueError(f"{type(model).__name__} needs at least one local crop (the query crops). {hint}")
    return local_crops


class _QueryTerm(DistillationTerm):
    """What both query terms share: the loss against per-query targets, its center and
    temperature, the agreement monitor, the collapse declaration."""

    log_name = "query"
    monitors = ("query_agreement",)
    temperature_name = "teacher_query_temp"

    loss_class = QueryLoss
    loss_name = "query_loss"

    def local_targets(self, outputs, values):
        """``L_query`` against the teacher's local-crop patches (PQCL's targets)."""
        g, b, targets = outputs.n_global, outputs.batch, outputs.teacher_local_patches
        student = ops.reshape(outputs.student["queries"], (g, b, targets.shape[1], self.out_dim))
        temp = values[self.temperature_name]
        # The monitor reads the center before the loss moves it.
        agreement = self.distillation.agreement(student, targets, teacher_temp=temp)
        value = self.distillation(student, targets, teacher_temp=temp)
        return value, {self.log_name: value, "query_agreement": agreement}


@keras.saving.register_keras_serializable(package="keras_pqcl")
class PositionalQueries(_QueryTerm):
    """PQCL's term (Zhang et al., ICML 2023): for each global view, one query token per
    local-crop patch, ``mask_token + sincos(position of that patch in the view)``, predicts
    the teacher's output for that patch computed from the local crop's pixels.

    The student never needs the local crops' pixels; the teacher encodes each local crop on
    its own (its position table interpolated to the local grid), and its patch logits,
    crops concatenated along the tokens, are the targets ``(B, T, K)``.

    Args:
        out_dim: prototypes ``K`` of the shared head.
        student_temp, center_momentum: 0.1, 0.9.
        teacher_temp: an :class:`~keras_pqcl.schedules.EpochRamp` (0.04 -> 0.07; PQCL's code
            delays its warm-up by iBOT's ``pred_start_epoch``).
        weight: ``lambda3``.
        position_code: how a query carries its position: ``"sincos"`` (default, PQCL) the
            fixed sin-cos code of its place in the view, for a backbone with the sin-cos table;
            ``"table"`` the backbone's own table read bilinearly at that place, which works
            with a learned table too (continuing DINOv2 weights). Both give a query on a
            patch exactly that patch's position code.

    Batches: ``"local_crops"`` and ``"query_coords"`` ``(B, G, n, L*L, 2)``.

    Logs: ``query`` and ``query_agreement`` (the reference's "acc": argmax agreement of the
    query-averaged student and target distributions), epoch means; ``teacher_query_temp``.
    """

    teacher_local_patches = True
    backbone_reasons = {
        "pos_embed": "the queries are fixed sin-cos codes of positions, so the image tokens must carry the same "
        "fixed code, as PQCL's pos_* architectures; or use position_code='table' (any table)",
    }

    CODES = ("sincos", "table")

    def __init__(self, out_dim, *args, position_code="sincos", **kwargs):
        if position_code not in self.CODES:
            raise ValueError(f"position_code must be one of {self.CODES}, got {position_code!r}.")
        super().__init__(out_dim, *args, **kwargs)
        self.position_code = position_code

    def needs(self):
        return Needs(mask_token=True, pos_embed="sincos" if self.position_code == "sincos" else None, queries=True)

    def query_tokens(self, model, outputs):
        local_crops_of(model, outputs.data, QUERY_HINT)
        positions = query_positions(model, outputs.data, QUERY_HINT, self.position_code)
        return model.student_backbone.positional_queries(positions), None

    def loss(self, outputs, values):
        return self.local_targets(outputs, values)

    def get_config(self):
        return {**super().get_config(), "position_code": self.position_code}


@keras.saving.register_keras_serializable(package="keras_pqcl")
class QueryCrops(_QueryTerm):
    """ADCLR's term (Zhang et al., ICLR 2023): small query crops, cut from the same image as
    the global views, are patch-embedded with the backbone's own patch embedding and appended
    to every global view; each query is contrasted with the same query in the other view.

    Query tokens ``(B, T, D)``: ``patch_embed(crop)`` plus a position code:
    ``query_position="crop"`` adds the backbone's own table interpolated to the crop's grid (as for
    a DINO local crop); ``"global"`` the sin-cos code of where each crop patch lies in each
    global view (``query_coords``, as PQCL builds them). Crops concatenated along the tokens.

    Args:
        out_dim, student_temp, teacher_temp, center_momentum, weight: as
            :class:`PositionalQueries`.
        query_position: ``"crop"`` (default) or ``"global"``.
        target: ``"cross_view"`` (default: the teacher's query outputs given the other global
            view, averaged over the ``G (G - 1)`` view pairs; the center moves once towards
            the mean of all ``G B T`` teacher query logits) or ``"crop"`` (the teacher's
            encoding of the query crop on its own, exactly as :class:`PositionalQueries`).

    Batches: ``"local_crops"`` (the query crops, a multiple of the patch size) and, for
    ``query_position="global"``, ``"query_coords"``.
    """

    POSITIONS = ("crop", "global")
    TARGETS = ("cross_view", "crop")
    backbone_reasons = {
        "pos_embed": "with query_position='global' the queries carry fixed sin-cos codes of their place in the "
        "view, which match the image tokens only if those carry the same code; or use query_position='crop'",
    }

    def __init__(self, out_dim, query_position="crop", target="cross_view", **kwargs):
        if query_position not in self.POSITIONS:
            raise ValueError(f"query_position must be one of {self.POSITIONS}, got {query_position!r}.")
        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}.")
        super().__init__(out_dim, **kwargs)
        self.query_position, self.target = query_position, target
        self.teacher_local_patches = target == "crop"

    def needs(self):
        glob = self.query_position == "global"
        return Needs(pos_embed="sincos" if glob else None, queries=glob)

    def tokens(self, backbone, local_crops, n_views, positions=None):
        """Query tokens ``(n_views * B, T, D)``, view-major, of the crops ``(B, n, s, s, 3)``
        embedded by ``backbone`` (the teacher embeds them with its own weights); ``positions``
        ``(n_views * B, T, D)`` for ``query_position="global"``."""
        grid = (local_crops.shape[2] // backbone.patch_size, local_crops.shape[3] // backbone.patch_size)
        tokens = backbone.patch_embed(crop_major(local_crops))  # (n B, L², D)
        if self.query_position == "crop":
            tokens = tokens + ops.cast(backbone.position_embedding(grid)[:, 1:], tokens.dtype)
        tokens = crops_along_tokens(tokens, local_crops.shape[1])
        if n_views > 1:
            tokens = ops.concatenate([tokens] * n_views, axis=0)
        if self.query_position == "global":
            if positions is None:
                raise ValueError(f"query_position='global' needs the queries' positions. {GLOBAL_POSITION_HINT}")
            tokens = tokens + ops.cast(positions, tokens.dtype)
        return tokens

    def query_tokens(self, model, outputs):
        data = outputs.data
        local_crops = local_crops_of(model, data, CROPS_HINT)
        p = model.student_backbone.patch_size
        height, width = local_crops.shape[2:4]
        if height % p or width % p:
            raise ValueError(
                f"the query crops are {height}x{width} px, not a multiple of the patch size {p}: the patch "
                f"embedding would drop their borders. Set MultiCropConfig(local_size=...) to a multiple of {p}, "
                f"e.g. {max(p, height // p * p)}."
            )
        if self.target == "cross_view" and outputs.n_global < 2:
            raise ValueError(
                f"target='cross_view' contrasts queries across global views and needs at least 2, got "
                f"{outputs.n_global}; set MultiCropConfig(n_global=2) or use target='crop'."
            )
        positions = query_positions(model, data, GLOBAL_POSITION_HINT) if self.query_position == "global" else None
        student = self.tokens(model.student_backbone, local_crops, outputs.n_global, positions)
        if self.target == "crop":
            return student, None
        return student, self.tokens(model.teacher_backbone, local_crops, outputs.n_global, positions)

    def loss(self, outputs, values):
        if self.target == "crop":
            return self.local_targets(outputs, values)
        g, b = outputs.n_global, outputs.batch
        n = outputs.teacher["queries"].shape[1]
        student = ops.reshape(outputs.student["queries"], (g, b, n, self.out_dim))
        teacher = ops.reshape(outputs.teacher["queries"], (g, b, n, self.out_dim))
        temp, pairs = values[self.temperature_name], [(a, v) for a in range(g) for v in range(g) if a != v]
        # Teacher view a is the target of student view v; the monitor reads the center first.
        agreement = sum(
            self.distillation.agreement(student[v : v + 1], teacher[a], teacher_temp=temp) for a, v in pairs
        ) / len(pairs)
        value = sum(
            self.distillation(student[v : v + 1], teacher[a], teacher_temp=temp, update_center=False) for a, v in pairs
        ) / len(pairs)
        self.distillation.update_center(teacher, axes=(0, 1, 2))
        return value, {self.log_name: value, "query_agreement": agreement}

    def get_config(self):
        config = super().get_config()
        config.update(query_position=self.query_position, target=self.target)
        return config
