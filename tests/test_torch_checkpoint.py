"""PyTorch DINO/iBOT/PQCL checkpoint import vs NumPy and torch forward passes.

The state dicts are made here with the official key names and torch layouts (Linear
``(out, in)``, Conv2d ``(D, 3, p, p)``); the references read them in those layouts, so a
transposition mistake in the importer shows up as an output mismatch.
"""

import argparse
import ast
import inspect
import logging
import sys

import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl.io import torch_checkpoint

from tests import helpers as H

pytestmark = H.IGNORE_NUMPY2_COPY_WARNING
to_numpy = H.to_numpy

DIM, DEPTH, HEADS, PATCH, IMAGE = 32, 2, 2, 8, 32
GRID, HIDDEN = IMAGE // PATCH, 4 * DIM
ARCH = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
ATOL = 1e-4


# ------------------------------------------------------------------------ state dicts
def sincos_table():
    """PQCL's fixed table: zero CLS row, then token (row r, col c) at (x, y) = (c, r)."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    table = np.concatenate([np.zeros((1, DIM)), H.mae_sincos(cols, rows, DIM)])
    return table[None].astype(np.float32)


def backbone_state(seed=0, sincos=False, mask_token=False):
    """Official ViT keys in torch layouts. Weights of std 0.15 keep attention far from
    uniform, so every term of the forward pass matters."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.15, loc=0.0):
        return (loc + scale * rng.normal(size=shape)).astype(np.float32)

    sd = {
        "cls_token": normal(1, 1, DIM, scale=0.5),
        "pos_embed": sincos_table() if sincos else normal(1, 1 + GRID * GRID, DIM, scale=0.5),
        "patch_embed.proj.weight": normal(DIM, 3, PATCH, PATCH, scale=0.1),
        "patch_embed.proj.bias": normal(DIM, scale=0.1),
        "norm.weight": normal(DIM, scale=0.3, loc=1.0),
        "norm.bias": normal(DIM, scale=0.3),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": normal(DIM, scale=0.3, loc=1.0),
                b + "norm1.bias": normal(DIM, scale=0.3),
                b + "attn.qkv.weight": normal(3 * DIM, DIM),
                b + "attn.qkv.bias": normal(3 * DIM),
                b + "attn.proj.weight": normal(DIM, DIM),
                b + "attn.proj.bias": normal(DIM),
                b + "norm2.weight": normal(DIM, scale=0.3, loc=1.0),
                b + "norm2.bias": normal(DIM, scale=0.3),
                b + "mlp.fc1.weight": normal(HIDDEN, DIM),
                b + "mlp.fc1.bias": normal(HIDDEN),
                b + "mlp.fc2.weight": normal(DIM, HIDDEN),
                b + "mlp.fc2.bias": normal(DIM),
            }
        )
    if mask_token:
        sd["masked_embed"] = normal(1, DIM, scale=0.5)
    return sd


def head_state(prefix, patch_head=False):
    """DINOHead/iBOTHead keys (MLP, weight-normed last layer); small shapes."""
    rng = np.random.default_rng(7)
    keys = {"mlp.0.weight": (16, DIM), "mlp.0.bias": (16,), "last_layer.weight_g": (8, 1)}
    keys["last_layer.weight_v"] = (8, 16)
    if patch_head:
        keys["last_layer2.weight_v"] = (8, 16)
    return {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}


def pqcl_unused_state(seed=5):
    """The weights PQCL's PosVisionTransformer carries but never calls: a model-level
    LayerNorm ``norm2`` (D,) and a spare block ``query_block`` (a block's 12 tensors)."""
    donor = backbone_state(seed=seed)
    sd = {"norm2.weight": donor["norm.weight"], "norm2.bias": donor["norm.bias"]}
    sd.update({"query_block." + k[len("blocks.0.") :]: v for k, v in donor.items() if k.startswith("blocks.0.")})
    assert len(sd) == 14
    return sd


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def images(batch=2, size=IMAGE, seed=3):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------- references
def numpy_forward(sd, imgs, masks=None):
    """ViT forward on the torch-layout state dict (CLS, patches), float64."""
    b = imgs.shape[0]
    kernel = sd["patch_embed.proj.weight"].astype(np.float64)  # (D, 3, p, p)
    # patchify flattens (row, col, channel); match it from the torch (out, in, kh, kw) kernel.
    kernel = kernel.transpose(2, 3, 1, 0).reshape(PATCH * PATCH * 3, DIM)
    x = H.patchify(imgs.astype(np.float64), PATCH) @ kernel + sd["patch_embed.proj.bias"]
    if masks is not None:
        x = np.where(np.asarray(masks, bool).reshape(b, -1, 1), sd["masked_embed"][None], x)
    cls = np.broadcast_to(sd["cls_token"].astype(np.float64), (b, 1, DIM))
    x = np.concatenate([cls, x], axis=1) + sd["pos_embed"]
    for i in range(DEPTH):
        p = f"blocks.{i}."

        def lin(name):
            return sd[p + name + ".weight"].T.astype(np.float64), sd[p + name + ".bias"]

        wqkv, bqkv = lin("attn.qkv")
        wproj, bproj = lin("attn.proj")
        weights = dict(
            n1=(sd[p + "norm1.weight"], sd[p + "norm1.bias"]),
            n2=(sd[p + "norm2.weight"], sd[p + "norm2.bias"]),
            attn=dict(wqkv=wqkv, bqkv=bqkv, wproj=wproj, bproj=bproj),
            fc1=lin("mlp.fc1"),
            fc2=lin("mlp.fc2"),
            heads=HEADS,
            eps=1e-6,
        )
        x, _, _ = H.block(x, weights)
    x = H.layer_norm(x, sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 0], x[:, 1:]


def torch_forward(sd, imgs):
    """The same network written with torch.nn.functional on NCHW input, float64."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in sd.items()}
    x = torch.as_tensor(imgs, dtype=torch.float64).permute(0, 3, 1, 2)
    x = F.conv2d(x, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=PATCH)
    b, _, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    pos = t["pos_embed"]
    if (h, w) != (GRID, GRID):
        # DINO's interpolate_pos_encoding: bicubic with the +0.1 scale factor.
        grid = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
        scale = ((h + 0.1) / GRID, (w + 0.1) / GRID)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, DIM)], dim=1)
    x = torch.cat([t["cls_token"].expand(b, -1, -1), x], dim=1) + pos
    tokens = x.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}."

        def norm(y, name):
            return F.layer_norm(y, (DIM,), t[p + name + ".weight"], t[p + name + ".bias"], 1e-6)

        def lin(y, name):
            return F.linear(y, t[p + name + ".weight"], t[p + name + ".bias"])

        qkv = lin(norm(x, "norm1"), "attn.qkv").reshape(b, tokens, 3, HEADS, DIM // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        x = x + lin(attn.transpose(1, 2).reshape(b, tokens, DIM), "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, "norm2"), "mlp.fc1")), "mlp.fc2")
    x = F.layer_norm(x, (DIM,), t["norm.weight"], t["norm.bias"], 1e-6)
    return x[:, 0].numpy(), x[:, 1:].numpy()


def assert_outputs(backbone, reference, imgs, masks=None):
    out = backbone(imgs) if masks is None else backbone(imgs, masks=masks)
    cls, patches = reference
    np.testing.assert_allclose(to_numpy(out["cls"]), cls, rtol=0, atol=ATOL)
    np.testing.assert_allclose(to_numpy(out["patches"]), patches, rtol=0, atol=ATOL)


def load(source, **kwargs):
    kwargs.setdefault("arch", ARCH)
    kwargs.setdefault("patch_size", PATCH)
    kwargs.setdefault("image_size", IMAGE)
    # Every weight is overwritten, so skip random initialisation (one XLA compile per
    # shape on JAX).
    with H.no_random_init():
        return kp.io.load_torch_checkpoint(source, **kwargs)


# ------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("key", ["teacher", "student"])
def test_dino_layout_matches_numpy_and_torch(key):
    teacher, student = backbone_state(seed=0), backbone_state(seed=1)
    checkpoint = {
        "teacher": {**prefixed(teacher, "backbone."), **head_state("head.")},
        "student": {**prefixed(student, "module.backbone."), **head_state("module.head.")},
        "epoch": 5,
    }
    backbone = load(checkpoint, key=key)
    sd = teacher if key == "teacher" else student
    assert backbone.pos_embed_kind == "learned" and backbone.mask_token is None
    assert (backbone.depth, backbone.embed_dim, backbone.num_heads) == (DEPTH, DIM, HEADS)
    imgs = images()
    assert_outputs(backbone, numpy_forward(sd, imgs), imgs)
    assert_outputs(backbone, torch_forward(sd, imgs), imgs)
    # 24 px inputs resample the 4 x 4 table to 3 x 3 exactly as DINO does.
    small = images(size=24)
    assert_outputs(backbone, torch_forward(sd, small), small)


def test_ibot_layout_maps_masked_embed_to_mask_token():
    sd = backbone_state(seed=2, mask_token=True)
    checkpoint = {
        "teacher": {**prefixed(sd, "backbone."), **head_state("head.", patch_head=True)},
        "student": {**prefixed(sd, "module.backbone."), **head_state("module.head.", True)},
    }
    backbone = load(checkpoint)
    assert backbone.mask_token is not None
    np.testing.assert_array_equal(to_numpy(backbone.mask_token), sd["masked_embed"])
    imgs = images()
    masks = np.random.default_rng(0).random((2, GRID, GRID)) < 0.4
    assert_outputs(backbone, numpy_forward(sd, imgs), imgs)
    assert_outputs(backbone, numpy_forward(sd, imgs, masks), imgs, masks)


def test_pqcl_sincos_table_is_detected_from_torch_tensors():
    torch = pytest.importorskip("torch")
    sd = backbone_state(seed=3, sincos=True, mask_token=True)
    tensors = {"teacher": {k: torch.from_numpy(v) for k, v in prefixed(sd, "backbone.").items()}}
    backbone = load(tensors)
    assert backbone.pos_embed_kind == "sincos"
    assert not backbone.pos_embed.trainable
    imgs = images()
    assert_outputs(backbone, numpy_forward(sd, imgs), imgs)
    assert_outputs(backbone, torch_forward(sd, imgs), imgs)
    # Forcing "learned" keeps the same numbers in a trainable table.
    learned = load(tensors, pos_embed="learned")
    assert learned.pos_embed_kind == "learned" and learned.pos_embed.trainable
    assert_outputs(learned, numpy_forward(sd, imgs), imgs)


def test_load_from_saved_training_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    sd = backbone_state(seed=4, mask_token=True)
    checkpoint = {
        "teacher": {k: torch.from_numpy(v) for k, v in prefixed(sd, "backbone.").items()},
        "student": {k: torch.from_numpy(v) for k, v in prefixed(sd, "module.backbone.").items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 10,
        # Training checkpoints pickle their options; the safe loader must accept them.
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    # image_size and patch_size are read from the checkpoint when None.
    backbone = load(str(path), patch_size=None, image_size=None)
    assert (backbone.patch_size, backbone.image_size) == (PATCH, IMAGE)
    imgs = images()
    assert_outputs(backbone, numpy_forward(sd, imgs), imgs)
    # A plain backbone file (like DINO's released weights) loads with the same call.
    plain = tmp_path / "backbone.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, plain)
    assert_outputs(load(plain), numpy_forward(sd, imgs), imgs)


def test_pqcl_unused_modules_are_dropped_and_logged(caplog):
    sd = backbone_state(seed=6, sincos=True, mask_token=True)
    extra = pqcl_unused_state()
    checkpoint = {
        "teacher": {**prefixed(sd, "backbone."), **prefixed(extra, "backbone."), **head_state("head.")},
        "student": {**prefixed({**sd, **extra}, "module.backbone."), **head_state("module.head.", True)},
    }
    imgs = images()
    plain = load({"teacher": prefixed(sd, "backbone.")})
    expected = plain(imgs)
    for key in ("teacher", "student"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=torch_checkpoint.__name__):
            backbone = load(checkpoint, key=key)  # strict=True
        lines = [r.getMessage() for r in caplog.records if r.name == torch_checkpoint.__name__]
        assert len(lines) == 1, lines
        assert "dropped 14 weights" in lines[0] and "(norm2.*, query_block.*)" in lines[0], lines[0]
        out = backbone(imgs)
        for name in ("cls", "patches"):
            np.testing.assert_array_equal(to_numpy(out[name]), to_numpy(expected[name]))
        assert_outputs(backbone, numpy_forward(sd, imgs), imgs)
        # The blocks' own norm2 is the checkpoint's, not the root-level one.
        np.testing.assert_array_equal(to_numpy(backbone.blocks[1].norm2.gamma), sd["blocks.1.norm2.weight"])
    # Only the unused modules are dropped: nothing is logged for a DINO checkpoint.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=torch_checkpoint.__name__):
        load(backbone_state())
    assert not [r for r in caplog.records if r.name == torch_checkpoint.__name__]


@pytest.mark.parametrize(
    "extra",
    ["fc_norm.weight", "query_block.gamma_1", "norm3.weight", "query_block.attn.relative_position_bias_table"],
)
def test_other_extra_keys_next_to_pqcl_ones_stay_errors(extra):
    sd = {**backbone_state(sincos=True, mask_token=True), **pqcl_unused_state()}
    sd[extra] = np.ones(DIM, np.float32)
    with pytest.raises(ValueError) as info:
        load({"teacher": prefixed(sd, "backbone.")})
    assert f"1 unexpected keys: [{extra}]" in str(info.value)


def test_root_norm2_does_not_stand_in_for_a_blocks_norm2():
    sd = {**backbone_state(sincos=True), **pqcl_unused_state()}
    del sd["blocks.1.norm2.weight"]
    with pytest.raises(ValueError, match=r"1 missing backbone keys: \[blocks.1.norm2.weight\]"):
        load(sd)


def test_select_falls_back_to_generic_wrappers():
    sd = backbone_state()
    assert torch_checkpoint._select({"state_dict": sd, "epoch": 1}, "teacher") is sd
    assert torch_checkpoint._select({"model": sd}, None) is sd
    assert torch_checkpoint._select(sd, "student") is sd  # plain dicts ignore key


# -------------------------------------------------------------------------- errors
def test_wrong_arch_names_the_checkpoint_arch():
    # Only the sizes matter: the check runs before anything is built or assigned.
    tiny_like = {"cls_token": np.zeros((1, 1, 192), np.float32)}
    tiny_like.update({f"blocks.{i}.norm1.weight": np.ones(192, np.float32) for i in range(12)})
    expected = r"12 blocks of width 192 \(vit_tiny\); arch='vit_small' expects 12 x 384"
    expected += r".*Pass arch='vit_tiny'"
    with pytest.raises(ValueError, match=expected):
        kp.io.load_torch_checkpoint({"teacher": tiny_like}, arch="vit_small")
    with pytest.raises(ValueError, match=r"2 blocks of width 32 \(no preset.*embed_dim=32"):
        kp.io.load_torch_checkpoint(backbone_state(), arch="vit_base", patch_size=PATCH)
    with pytest.raises(ValueError, match="Unknown arch"):
        kp.io.load_torch_checkpoint(backbone_state(), arch="vit_huge")


def test_missing_and_unexpected_keys_are_listed():
    sd = backbone_state()
    del sd["blocks.1.mlp.fc2.weight"], sd["norm.bias"]
    sd["blocks.0.attn.relative_position_bias_table"] = np.zeros((9, HEADS), np.float32)
    with pytest.raises(ValueError) as info:
        load({"teacher": prefixed(sd, "backbone.")})
    message = str(info.value)
    assert "2 missing backbone keys: [blocks.1.mlp.fc2.weight, norm.bias]" in message
    assert "1 unexpected keys: [blocks.0.attn.relative_position_bias_table]" in message
    assert "strict=False" in message
    with pytest.warns(UserWarning, match="2 missing backbone keys"):
        backbone = load(sd, strict=False)
    np.testing.assert_array_equal(to_numpy(backbone.norm.gamma), sd["norm.weight"])


def test_unknown_key_lists_available_entries():
    checkpoint = {"teacher": backbone_state(), "student": backbone_state(), "epoch": 3}
    with pytest.raises(ValueError, match=r"no 'ema' entry.*\[teacher, student\].*\[epoch\]"):
        kp.io.load_torch_checkpoint(checkpoint, key="ema")
    with pytest.raises(ValueError, match=r"no 'teacher' entry.*\[student\]"):
        kp.io.load_torch_checkpoint({"student": backbone_state()})


def test_geometry_mismatches_name_the_fix():
    sd = backbone_state()
    with pytest.raises(ValueError, match=r"4x4 grid, i.e. image_size=32.*Pass image_size=32"):
        kp.io.load_torch_checkpoint(sd, arch=ARCH, patch_size=PATCH)  # image_size=224
    with pytest.raises(ValueError, match=r"patch embedding is 8x8.*Pass patch_size=8"):
        kp.io.load_torch_checkpoint(sd, arch=ARCH, image_size=IMAGE)  # patch_size=16
    with pytest.raises(ValueError, match="not the fixed 2-D sin-cos table"):
        load(sd, pos_embed="sincos")


def test_missing_torch_names_the_install_command(tmp_path, monkeypatch):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install torch==2\.13\.0"):
        kp.io.load_torch_checkpoint(str(path))


def test_module_does_not_import_torch_at_top_level():
    tree = ast.parse(inspect.getsource(torch_checkpoint))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "torch" for name in names)
