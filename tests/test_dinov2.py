"""DINOv2 backbones: LayerScale, registers, SwiGLU, DINOv2's position-table resampling and the
importers of the official ``.pth`` layout and of Hugging Face's ``Dinov2Model`` layout.

The state dicts are made here with the official key names and torch layouts (Linear
``(out, in)``, Conv2d ``(D, 3, p, p)``); the NumPy forward below reads them in those layouts,
so a transposition or ordering mistake in the importer shows up as an output mismatch.
"""

import math
import sys

import numpy as np
import pytest

import keras_pqcl as kp
from keras_pqcl.io import torch_checkpoint

from tests import helpers as H

pytestmark = H.IGNORE_NUMPY2_COPY_WARNING
to_numpy = H.to_numpy

DIM, DEPTH, HEADS, PATCH = 32, 2, 2, 14
IMAGE, GRID = 42, 3  # the position table's grid; 28 px (2 x 2) and 56 px (4 x 4) resample it
HIDDEN = 4 * DIM
SWIGLU_HIDDEN = 88  # DINOv2's rule on 4 * 32: int(128 * 2 / 3) = 85, rounded up to a multiple of 8
ARCH = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
ATOL = 1e-4


# ------------------------------------------------------------------------ state dicts
def dinov2_state(seed=0, registers=0, swiglu=False, layer_scale=True):
    """Official DINOv2 keys in torch layouts. LayerScale gains far from 1e-5 (and from 1) so
    that a missing or misplaced gain changes the outputs."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=0.15, loc=0.0):
        return (loc + scale * rng.normal(size=shape)).astype(np.float32)

    sd = {
        "cls_token": normal(1, 1, DIM, scale=0.5),
        "pos_embed": normal(1, 1 + GRID * GRID, DIM, scale=0.5),
        "mask_token": normal(1, DIM, scale=0.5),
        "patch_embed.proj.weight": normal(DIM, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": normal(DIM, scale=0.1),
        "norm.weight": normal(DIM, scale=0.3, loc=1.0),
        "norm.bias": normal(DIM, scale=0.3),
    }
    if registers:
        sd["register_tokens"] = normal(1, registers, DIM, scale=0.5)
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
            }
        )
        if swiglu:
            sd.update(
                {
                    b + "mlp.w12.weight": normal(2 * SWIGLU_HIDDEN, DIM),
                    b + "mlp.w12.bias": normal(2 * SWIGLU_HIDDEN),
                    b + "mlp.w3.weight": normal(DIM, SWIGLU_HIDDEN),
                    b + "mlp.w3.bias": normal(DIM),
                }
            )
        else:
            sd.update(
                {
                    b + "mlp.fc1.weight": normal(HIDDEN, DIM),
                    b + "mlp.fc1.bias": normal(HIDDEN),
                    b + "mlp.fc2.weight": normal(DIM, HIDDEN),
                    b + "mlp.fc2.bias": normal(DIM),
                }
            )
        if layer_scale:
            sd[b + "ls1.gamma"] = normal(DIM, scale=0.5, loc=0.5)
            sd[b + "ls2.gamma"] = normal(DIM, scale=0.5, loc=0.5)
    return sd


def hugging_face_state(sd):
    """The same weights under Hugging Face ``Dinov2Model`` names: q, k and v are the three
    row blocks of the fused qkv projection, in that order."""
    renames = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "register_tokens": "embeddings.register_tokens",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attn.proj": "attention.output.dense",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.w12": "mlp.weights_in",
        "mlp.w3": "mlp.weights_out",
    }
    out = {}
    for name, value in sd.items():
        if name in renames:
            out[renames[name]] = value
            continue
        _, index, rest = name.split(".", 2)
        prefix = f"encoder.layer.{index}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for j, which in enumerate(("query", "key", "value")):
                out[prefix + f"attention.attention.{which}.{kind}"] = value[j * DIM : (j + 1) * DIM]
            continue
        for old, new in block.items():
            if rest == old or rest.startswith(old + "."):
                out[prefix + new + rest[len(old) :]] = value
                break
        else:
            raise AssertionError(name)
    return out


def images(batch=2, size=IMAGE, seed=3):
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------- references
def resample_1d(values, out_size, offset, antialias):
    """PyTorch's bicubic ``F.interpolate`` (align_corners=False) along axis 0, as DINOv2 calls
    it: scale factor ``(out + offset) / in`` when ``offset`` > 0, else by size.

    Without antialias: Keys a = -0.75 on the 4 taps around ``(d + 0.5) / s - 0.5``, clamped
    to the border. With it: Keys a = -0.5 stretched by the shrink factor, taps beyond the
    border dropped and the weights renormalised.
    """
    values = np.asarray(values, np.float64)
    n = values.shape[0]
    ratio = n / (out_size + offset) if offset else n / out_size
    out = np.zeros((out_size,) + values.shape[1:])
    for d in range(out_size):
        if not antialias:
            src = (d + 0.5) * ratio - 0.5
            i0 = math.floor(src)
            for k in (-1, 0, 1, 2):
                out[d] += H.cubic(src - i0 - k) * values[min(max(i0 + k, 0), n - 1)]
            continue
        support, stretch = (2.0 * ratio, 1.0 / ratio) if ratio >= 1 else (2.0, 1.0)
        center = (d + 0.5) * ratio
        taps = range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n))
        weights = np.array([H.cubic((j + 0.5 - center) * stretch, a=-0.5) for j in taps])
        out[d] = np.tensordot(weights / weights.sum(), values[list(taps)], axes=1)
    return out


def resample_table(patch_pos, out_hw, offset, antialias):
    """(GRID * GRID, D) patch rows -> (h * w, D), rows then columns."""
    h, w = out_hw
    if (h, w) == (GRID, GRID):
        return np.asarray(patch_pos, np.float64)
    grid = patch_pos.reshape(GRID, GRID, -1)
    grid = resample_1d(grid, h, offset, antialias)
    grid = resample_1d(grid.transpose(1, 0, 2), w, offset, antialias).transpose(1, 0, 2)
    return grid.reshape(h * w, -1)


def numpy_forward(sd, imgs, offset=0.1, antialias=False, masks=None):
    """DINOv2 forward on the torch-layout state dict, float64: (cls, registers, patches)."""
    b, height, width, _ = imgs.shape
    grid_hw = (height // PATCH, width // PATCH)
    kernel = sd["patch_embed.proj.weight"].astype(np.float64).transpose(2, 3, 1, 0).reshape(-1, DIM)
    x = H.patchify(imgs.astype(np.float64), PATCH) @ kernel + sd["patch_embed.proj.bias"]
    if masks is not None:
        x = np.where(np.asarray(masks, bool).reshape(b, -1, 1), sd["mask_token"][None], x)
    pos = sd["pos_embed"][0].astype(np.float64)
    pos = np.concatenate([pos[:1], resample_table(pos[1:], grid_hw, offset, antialias)])
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, DIM)), x], axis=1) + pos
    registers = sd.get("register_tokens")
    r = 0 if registers is None else registers.shape[1]
    if r:  # after the positions are added: registers carry none
        x = np.concatenate([x[:, :1], np.broadcast_to(registers, (b, r, DIM)), x[:, 1:]], axis=1)
    for i in range(DEPTH):
        p = f"blocks.{i}."

        def lin(name, h):
            return h @ sd[p + name + ".weight"].T.astype(np.float64) + sd[p + name + ".bias"]

        def gain(name):
            return sd.get(p + name + ".gamma", 1.0)

        w = dict(
            wqkv=sd[p + "attn.qkv.weight"].T.astype(np.float64),
            bqkv=sd[p + "attn.qkv.bias"],
            wproj=sd[p + "attn.proj.weight"].T.astype(np.float64),
            bproj=sd[p + "attn.proj.bias"],
        )
        attn, _, _ = H.mha(H.layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"]), w, HEADS)
        x = x + gain("ls1") * attn
        h = H.layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        if p + "mlp.w12.weight" in sd:
            gate_value = lin("mlp.w12", h)
            gate, value = np.split(gate_value, 2, axis=-1)
            h = lin("mlp.w3", gate / (1.0 + np.exp(-gate)) * value)
        else:
            h = lin("mlp.fc2", H.gelu(lin("mlp.fc1", h)))
        x = x + gain("ls2") * h
    x = H.layer_norm(x, sd["norm.weight"], sd["norm.bias"])
    return x[:, 0], x[:, 1 : 1 + r], x[:, 1 + r :]


def assert_outputs(backbone, reference, imgs, masks=None):
    out = backbone.forward_features(imgs, masks=masks) if masks is not None else backbone.forward_features(imgs)
    cls, registers, patches = reference
    np.testing.assert_allclose(to_numpy(out["cls"]), cls, rtol=0, atol=ATOL)
    np.testing.assert_allclose(to_numpy(out["patches"]), patches, rtol=0, atol=ATOL)
    if registers.shape[1]:
        np.testing.assert_allclose(to_numpy(out["registers"]), registers, rtol=0, atol=ATOL)
    # The contract's last block: CLS then the patches, registers left out.
    np.testing.assert_allclose(
        to_numpy(out["last_blocks"][-1]), np.concatenate([cls[:, None], patches], 1), rtol=0, atol=ATOL
    )


def load(source, **kwargs):
    kwargs.setdefault("arch", ARCH)
    kwargs.setdefault("patch_size", PATCH)
    kwargs.setdefault("image_size", IMAGE)
    with H.no_random_init():  # every weight is overwritten
        return kp.io.load_torch_checkpoint(source, **kwargs)


# --------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_resampling_reference_matches_torch_interpolate(offset, antialias):
    """Anchors the NumPy reference above to PyTorch itself, for both DINOv2 conventions."""
    torch = pytest.importorskip("torch")
    table = np.random.default_rng(0).normal(size=(GRID * GRID, 5))
    grid = torch.as_tensor(table.T.reshape(1, 5, GRID, GRID))
    for out in (2, 4, 7):
        scale = (out + offset) / GRID
        resize = dict(scale_factor=(scale, scale)) if offset else dict(size=(out, out))
        expected = torch.nn.functional.interpolate(
            grid, mode="bicubic", align_corners=False, antialias=antialias, **resize
        )
        expected = expected[0].numpy().reshape(5, out * out).T
        np.testing.assert_allclose(resample_table(table, (out, out), offset, antialias), expected, atol=1e-6)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_backbone_resamples_the_table_like_dinov2(offset, antialias):
    from keras import ops

    table = np.random.default_rng(1).normal(size=(1, GRID * GRID, 8)).astype(np.float32)
    for out in ((2, 2), (4, 5)):
        got = kp.layers.interpolate_grid(ops.convert_to_tensor(table), (GRID, GRID), out, offset, antialias)
        np.testing.assert_allclose(to_numpy(got)[0], resample_table(table[0], out, offset, antialias), atol=1e-5)


# ------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("registers", [0, 4])
def test_official_layout_matches_numpy(registers):
    sd = dinov2_state(seed=registers, registers=registers)
    checkpoint = {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, "dino_head.mlp.0.weight": np.ones(3)}}
    backbone = load(checkpoint)
    assert backbone.num_register_tokens == registers and backbone.layer_scale_init
    assert backbone.mask_token is not None and backbone.ffn == "mlp"
    # DINOv2's released models: 0.1 offset without registers, by size and antialiased with them.
    convention = (0.0, True) if registers else (0.1, False)
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == convention
    for size in (IMAGE, 28):  # the table's own grid, then resampled to 2 x 2
        imgs = images(size=size)
        assert_outputs(backbone, numpy_forward(sd, imgs, *convention), imgs)
    masks = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool)
    imgs = images(size=28)
    assert_outputs(backbone, numpy_forward(sd, imgs, *convention, masks=masks), imgs, masks)
    assert tuple(backbone.get_last_selfattention(imgs).shape) == (2, HEADS, 5, 5)


def test_swiglu_layout_and_chunked_training_checkpoint():
    """ViT-g's SwiGLU FFN, in a DINOv2 training checkpoint whose blocks are chunked
    (``blocks.{chunk}.{index}``) next to its DINO and iBOT heads."""
    sd = dinov2_state(seed=5, registers=4, swiglu=True)
    chunked = {}
    for name, value in sd.items():
        if name.startswith("blocks."):
            # One chunk (block_chunks=1): blocks.0.{index}.
            name = "blocks.0." + name[len("blocks.") :]
        chunked["backbone." + name] = value
    chunked["ibot_head.last_layer.weight_g"] = np.ones((8, 1), np.float32)
    backbone = load({"teacher": chunked, "iteration": 10})
    assert backbone.ffn == "swiglu" and backbone.blocks[0].mlp.hidden_dim == SWIGLU_HIDDEN
    for size in (IMAGE, 56):
        imgs = images(size=size)
        assert_outputs(backbone, numpy_forward(sd, imgs, 0.0, True), imgs)


@pytest.mark.parametrize("registers", [0, 4])
def test_hugging_face_layout_matches_numpy(registers):
    sd = dinov2_state(seed=7, registers=registers)
    hf = hugging_face_state(sd)
    assert "encoder.layer.1.attention.attention.value.bias" in hf
    backbone = load(hf)
    # transformers' Dinov2Model resamples by size with antialiasing.
    assert (backbone.interpolate_offset, backbone.interpolate_antialias) == (0.0, True)
    for size in (IMAGE, 28):
        imgs = images(size=size)
        assert_outputs(backbone, numpy_forward(sd, imgs, 0.0, True), imgs)
    # The other convention on request, and a task model's "dinov2." prefix and classifier.
    task = {**{"dinov2." + k: v for k, v in hf.items()}, "classifier.weight": np.ones((3, 2 * DIM))}
    v1 = load(task, interpolate_offset=0.1, interpolate_antialias=False)
    imgs = images(size=28)
    assert_outputs(v1, numpy_forward(sd, imgs, 0.1, False), imgs)


def test_hugging_face_swiglu_safetensors_file(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    sd = dinov2_state(seed=8, registers=4, swiglu=True)
    path = tmp_path / "model.safetensors"
    safetensors.save_file(hugging_face_state(sd), str(path))
    backbone = load(str(path), patch_size=None, image_size=None)
    assert (backbone.patch_size, backbone.image_size, backbone.ffn) == (PATCH, IMAGE, "swiglu")
    imgs = images(size=28)
    assert_outputs(backbone, numpy_forward(sd, imgs, 0.0, True), imgs)


def test_official_pth_file_with_a_dinov2_preset_name(tmp_path):
    torch = pytest.importorskip("torch")
    sd = dinov2_state(seed=9, registers=4)
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    # DINOv2's hub names are accepted as arch; their sizes are checked against the weights.
    backbone = load(str(path))
    imgs = images(size=28)
    assert_outputs(backbone, numpy_forward(sd, imgs, 0.0, True), imgs)
    with pytest.raises(ValueError, match=r"2 blocks of width 32 .*dinov2_vits14_reg.* expects 12 x 384"):
        load(str(path), arch="dinov2_vits14_reg")


@pytest.mark.parametrize("registers, ffn", [(0, "mlp"), (4, "swiglufused")])
def test_matches_the_official_dinov2_module_when_its_source_is_importable(registers, ffn, monkeypatch):
    """The official ``DinoVisionTransformer`` with random weights (no download): runs only
    where the facebookresearch/dinov2 source is importable (e.g. its checkout on PYTHONPATH)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("XFORMERS_DISABLED", "1")  # the reference attention, on CPU
    vits = pytest.importorskip("dinov2.models.vision_transformer")
    offset, antialias = (0.0, True) if registers else (0.1, False)
    torch.manual_seed(registers)
    model = vits.DinoVisionTransformer(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1e-5,
        ffn_layer=ffn,
        block_chunks=DEPTH,
        num_register_tokens=registers,
        interpolate_offset=offset,
        interpolate_antialias=antialias,
    ).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.copy_(0.2 * torch.randn_like(weight) + (1.0 if weight.ndim == 1 else 0.0))
    backbone = load({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}})
    for size in (IMAGE, 28):
        imgs = images(size=size)
        with torch.no_grad():
            ref = model.forward_features(torch.from_numpy(imgs).permute(0, 3, 1, 2))
        out = backbone.forward_features(imgs)
        np.testing.assert_allclose(to_numpy(out["cls"]), ref["x_norm_clstoken"].numpy(), atol=ATOL)
        np.testing.assert_allclose(to_numpy(out["patches"]), ref["x_norm_patchtokens"].numpy(), atol=ATOL)


# -------------------------------------------------------------------------- errors
def test_missing_and_unexpected_keys_are_named():
    sd = dinov2_state(registers=4)
    del sd["blocks.1.ls2.gamma"], sd["register_tokens"]
    sd["blocks.0.attn.rope.freqs"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError) as info:
        load(sd)
    message = str(info.value)
    assert "1 missing backbone keys: [blocks.1.ls2.gamma]" in message
    assert "1 unexpected keys: [blocks.0.attn.rope.freqs]" in message and "strict=False" in message


def test_hugging_face_missing_value_projection_is_named():
    hf = hugging_face_state(dinov2_state())
    del hf["encoder.layer.1.attention.attention.value.weight"]
    with pytest.raises(ValueError) as info:
        load(hf)
    message = str(info.value)
    assert "1 missing backbone keys: [blocks.1.attn.qkv.weight]" in message
    assert "encoder.layer.1.attention.attention.query.weight" in message  # left unfused, unexpected


def test_preset_that_disagrees_with_the_weights_names_the_fix():
    # Only the sizes of ViT-S matter: the check runs before anything is built.
    sd = {"cls_token": np.zeros((1, 1, 384), np.float32), "register_tokens": np.zeros((1, 4, 384), np.float32)}
    sd.update({f"blocks.{i}.norm1.weight": np.ones(384, np.float32) for i in range(12)})
    with pytest.raises(ValueError, match=r"0 register tokens.*checkpoint has 4 register.*arch='vit_small14_reg'"):
        kp.io.load_torch_checkpoint(sd, arch="dinov2_vits14", patch_size=None)


def test_missing_safetensors_names_the_install_command(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match=r"pip install safetensors"):
        kp.io.load_torch_checkpoint(str(path))


def test_bad_backbone_options_are_errors():
    with pytest.raises(ValueError, match="ffn must be one of"):
        kp.backbones.VisionTransformer(PATCH, DIM, 1, HEADS, image_size=28, ffn="geglu")
    with pytest.raises(ValueError, match="num_register_tokens"):
        kp.backbones.VisionTransformer(PATCH, DIM, 1, HEADS, image_size=28, num_register_tokens=-1)


# ------------------------------------------------------------------------- presets
def test_presets_have_dinov2_sizes():
    presets = kp.backbones.DINOV2_PRESETS
    sizes = {name: (p["embed_dim"], p["depth"], p["num_heads"]) for name, p in presets.items()}
    assert sizes["vit_small14"] == (384, 12, 6) and sizes["vit_base14"] == (768, 12, 12)
    assert sizes["vit_large14"] == (1024, 24, 16) and sizes["vit_giant14"] == (1536, 40, 24)
    assert presets["vit_giant14"]["ffn"] == "swiglu" and kp.layers.swiglu_hidden_dim(4 * 1536) == 4096
    for name in ("vit_small14", "vit_base14", "vit_large14", "vit_giant14"):
        assert sizes[name + "_reg"] == sizes[name]
        assert presets[name + "_reg"]["num_register_tokens"] == 4
        assert presets[name]["layer_scale_init"] == 1e-5


def test_vit_small14_reg_has_the_released_parameter_count():
    with H.no_random_init():
        backbone = kp.backbones.vit_small14_reg()
    d, grid = 384, 518 // 14
    per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d) + 2 * d  # LN, qkv, proj, MLP, LS
    expected = 12 * per_block + (3 * 14 * 14 * d + d) + d + (1 + grid * grid) * d + 4 * d + 2 * d
    assert backbone.patch_size == 14 and backbone.count_params() == expected


def test_config_round_trip_keeps_the_dinov2_options():
    with H.no_random_init():  # weights set below (random draws cost one XLA compile each on JAX)
        backbone = kp.backbones.VisionTransformer(
            PATCH,
            DIM,
            DEPTH,
            HEADS,
            image_size=28,
            layer_scale_init=1e-5,
            num_register_tokens=2,
            ffn="swiglu",
            interpolate_offset=0.0,
            interpolate_antialias=True,
        )
        clone = kp.backbones.VisionTransformer.from_config(backbone.get_config())
    rng = np.random.default_rng(0)
    backbone.set_weights([1.0 + 0.3 * rng.normal(size=w.shape) for w in backbone.get_weights()])
    clone.set_weights(backbone.get_weights())
    imgs = images(size=42)
    np.testing.assert_array_equal(to_numpy(clone(imgs)["patches"]), to_numpy(backbone(imgs)["patches"]))
    assert [w.path.split("/", 1)[1] for w in clone.weights] == [w.path.split("/", 1)[1] for w in backbone.weights]
    # A plain ViT's config keeps the keys of the versions before these options (its files load there).
    with H.no_random_init():
        plain = kp.backbones.VisionTransformer(PATCH, DIM, 1, HEADS, image_size=28).get_config()
    assert not {"layer_scale_init", "num_register_tokens", "ffn", "interpolate_offset"} & set(plain)


# ------------------------------------------------------------------------ training
def test_dino_trains_on_a_dinov2_style_backbone():
    """One fit step of DINO on registers + LayerScale: the loss is finite and the LayerScale
    gains and register tokens receive gradient (they move)."""
    import tensorflow as tf

    backbone = kp.backbones.VisionTransformer(
        PATCH,
        DIM,
        DEPTH,
        HEADS,
        image_size=28,
        layer_scale_init=1e-5,
        num_register_tokens=2,
        interpolate_offset=0.0,
        interpolate_antialias=True,
    )
    model = kp.models.DINO(backbone, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    model.compile(optimizer=kp.optimizers.dino_adamw(4, 1, 1, warmup_epochs=0, base_lr=1e-2))
    rng = np.random.default_rng(0)
    data = {
        "global_crops": rng.normal(size=(4, 2, 28, 28, 3)).astype(np.float32),
        "local_crops": rng.normal(size=(4, 2, 14, 14, 3)).astype(np.float32),
    }
    before = {v.path: to_numpy(v).copy() for v in backbone.trainable_weights}
    history = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(4, drop_remainder=True), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    moved = {v.path for v in backbone.trainable_weights if not np.array_equal(to_numpy(v), before[v.path])}
    assert any(path.endswith("register_tokens") for path in moved)
    assert any(path.endswith("ls1/gamma") for path in moved) and any(path.endswith("ls2/gamma") for path in moved)
    teacher = model.teacher_backbone
    assert teacher.num_register_tokens == 2 and teacher.blocks[0].ls1 is not None


def test_module_still_imports_without_safetensors_at_top_level():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(torch_checkpoint))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] in ("torch", "safetensors") for name in names)
