"""``synthetic_scenes``: a small procedural dataset embedded in the library.

It lets every example, test and smoke run work offline. Each image shows a
textured background and 1-4 textured objects. An object's class fixes its
*shape* and its *texture family*. Every object is painted in the same two
colours (mixed by its texture), and every background in dimmed versions of
them, so colour says nothing about the label *and* cannot tell two images
apart: a network, supervised or self-supervised, must look at shape and
texture. (Colours drawn at random per object, as in the first version, let
self-distillation match two views of an image by their colours alone; its
features then learned nothing about the classes, and a small ViT trained
with labels reached about 25 % where it reaches about 60 % on this palette.)

Classes (shape / texture family)::

    0 disc       / checker        5 diamond    / dots
    1 square     / plain          6 ellipse    / concentric rings
    2 triangle   / stripes        7 frame      / checker
    3 ring       / gradient       8 half_disc  / dots
    4 cross      / stripes        9 flower     / plain

One main object (the area of a disc of radius 22-34 % of the image side,
centred in the middle 40 % of the image) is painted first; 0-3 smaller
distractors (radius 8-18 %, anywhere, possibly cut by the border) of random
classes are painted on top of it. Every object gets a random rotation
(±20°), anisotropic stretch and texture frequency/phase.

* ``label`` = class of the object with the most *visible* pixels in the
  final image (ties: the earlier painted object).
* ``masks`` = per-pixel ``class + 1`` of the topmost object, 0 = background.

Generation is vectorised numpy (chunks of images at once); 2,000 images of
64 px take a few seconds on one CPU core. Fully determined by the
arguments (``seed`` included).
"""

import numpy as np

__all__ = ["SYNTHETIC_CLASS_NAMES", "synthetic_scenes"]

SYNTHETIC_CLASS_NAMES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "ellipse",
    "frame",
    "half_disc",
    "flower",
)

_MAX_OBJECTS = 4
_CHUNK = 256

# Scene layout (sizes as fractions of the image side): these values *are* the dataset. The dict
# is private; benchmarks/synthetic_difficulty.py (--layout) overrides it to test variants
# (greyscale: objects and backgrounds in grey levels; palette=P: every colour pair drawn from
# P fixed pairs shared by all classes, P=1 being the dataset, P=0 a random pair per object and
# background as in the first version; repeat_main=p: each distractor takes the main object's
# class with probability p, so a scene shows several instances of one class, and the label
# becomes the class with the most visible pixels summed over its instances). Override it
# before the first image is generated in a process: data.sources caches what it generated.
_LAYOUT = dict(
    main_radius=(0.22, 0.34),
    main_centre=(0.3, 0.7),
    distractor_radius=(0.08, 0.18),
    max_distractors=3,
    texture_freq=(1.3, 2.2),
    greyscale=False,
    palette=1,
    repeat_main=0.0,
)

# Texture family per class (indices into _TEXTURES).
_TEXTURES = ("plain", "stripes", "checker", "dots", "gradient", "concentric")
_CLASS_TEXTURE = (2, 0, 1, 4, 1, 3, 5, 2, 3, 0)


# ---------------------------------------------------------------------------
# Shapes: boolean "inside" tests in object coordinates (u right, v down,
# object radius = 1). Each takes and returns arrays of the same shape.
# ---------------------------------------------------------------------------
def _disc(u, v):
    return u * u + v * v <= 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _triangle(u, v):
    # Equilateral triangle pointing up (y = -v is "up"), inradius 0.55.
    y = -v
    c, s = 0.8660254, 0.5
    return (-y <= 0.55) & (c * u + s * y <= 0.55) & (-c * u + s * y <= 0.55)


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.55**2)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))


def _diamond(u, v):
    return np.abs(u) + np.abs(v) <= 1.05


def _ellipse(u, v):
    return u * u + (v / 0.5) ** 2 <= 1.0


def _frame(u, v):
    m = np.maximum(np.abs(u), np.abs(v))
    return (m <= 0.85) & (m >= 0.5)


def _half_disc(u, v):
    return (u * u + (v + 0.3) ** 2 <= 1.0) & (v <= 0.0)


def _flower(u, v):
    r = np.sqrt(u * u + v * v)
    return r <= 0.6 + 0.35 * np.cos(5.0 * np.arctan2(v, u))


_SHAPES = (_disc, _square, _triangle, _ring, _cross, _diamond, _ellipse, _frame, _half_disc, _flower)


def _shape_areas():
    """Area of each shape at radius 1 (numerically, on a fine grid)."""
    g = np.linspace(-1.5, 1.5, 301, dtype=np.float32)
    u, v = np.meshgrid(g, g)
    cell = (g[1] - g[0]) ** 2
    return np.array([fn(u, v).sum() * cell for fn in _SHAPES], np.float32)


# Radius multiplier per class so every shape covers the area of a disc of
# the drawn radius: otherwise thin shapes (ring, frame, flower) would rarely
# be the largest object and the labels would be very unbalanced.
_AREA_SCALE = np.sqrt(np.pi / _shape_areas())


# ---------------------------------------------------------------------------
# Textures: mixing weight t in [0, 1] between the two instance colours.
# freq/phase/orient are [m, 1, 1] arrays.
# ---------------------------------------------------------------------------
def _texture(family, u, v, freq, phase, orient):
    name = _TEXTURES[family]
    if name == "plain":
        # A faint shading so "plain" is not perfectly flat.
        return 0.15 * np.clip((u + 1.0) * 0.5, 0.0, 1.0)
    if name == "stripes":
        w = u * np.cos(orient) + v * np.sin(orient)
        return (np.sin(2 * np.pi * freq * w + phase) > 0).astype(np.float32)
    if name == "checker":
        a = np.floor(freq * u + phase) + np.floor(freq * v + phase)
        return np.mod(a, 2.0).astype(np.float32)
    if name == "dots":
        return ((np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v + phase)) > 0.35).astype(np.float32)
    if name == "gradient":
        w = u * np.cos(orient) + v * np.sin(orient)
        return np.clip((w + 1.0) * 0.5, 0.0, 1.0)
    if name == "concentric":
        r = np.sqrt(u * u + v * v)
        return (np.sin(2 * np.pi * freq * r + phase) > 0).astype(np.float32)
    raise AssertionError(name)


def _upsample_bilinear(grid, size):
    """[n, g, g, c] → [n, size, size, c], linear interpolation (corners kept)."""
    g = grid.shape[1]
    pos = np.linspace(0.0, g - 1.0, size, dtype=np.float32)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, g - 1)
    f = (pos - i0).astype(np.float32)
    rows = grid[:, i0] * (1 - f)[None, :, None, None] + grid[:, i1] * f[None, :, None, None]
    return rows[:, :, i0] * (1 - f)[None, None, :, None] + rows[:, :, i1] * f[None, None, :, None]


def _contrasting_pair(rng, shape):
    """Two random RGB colours (0..255) that differ enough to show a texture."""
    c1 = rng.uniform(0, 255, shape + (3,)).astype(np.float32)
    c2 = rng.uniform(0, 255, shape + (3,)).astype(np.float32)
    close = np.linalg.norm(c1 - c2, axis=-1, keepdims=True) < 110.0
    c2 = np.where(close, 255.0 - c1, c2)
    return c1, c2


def synthetic_scenes(num_images, image_size=64, num_classes=10, seed=0):
    """Generates the ``synthetic_scenes`` dataset.

    Args:
        num_images: number of images N (>= 1).
        image_size: side S in pixels (>= 16).
        num_classes: K in [2, 10]; the first K of ``SYNTHETIC_CLASS_NAMES``.
        seed: int; the output is a pure function of the arguments.

    Returns:
        dict of numpy arrays:

        * ``images``: uint8 ``[N, S, S, 3]``.
        * ``labels``: int32 ``[N]``, class of the object with the largest
          visible area.
        * ``masks``: uint8 ``[N, S, S]``, 0 = background, ``k + 1`` = class k
          (topmost object).
        * ``instance_masks``: uint8 ``[N, S, S]``, 0 = background, ``j + 1`` =
          object slot j (slots in painting order, bottom first).
        * ``object_classes``: int32 ``[N, 4]``, class per slot, -1 if unused.
        * ``object_areas``: int32 ``[N, 4]``, visible pixels per slot.
    """
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}.")
    if int(image_size) < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size!r}.")
    if not 2 <= int(num_classes) <= len(SYNTHETIC_CLASS_NAMES):
        raise ValueError(f"num_classes must be in [2, {len(SYNTHETIC_CLASS_NAMES)}], got {num_classes!r}.")
    n, size, k = int(num_images), int(image_size), int(num_classes)
    rng = np.random.default_rng(seed)
    m = _MAX_OBJECTS

    # ---- draw every random parameter up front (chunk-independent) --------
    lay = _LAYOUT
    n_obj = rng.integers(1, lay["max_distractors"] + 2, n)
    cls = rng.integers(0, k, (n, m))
    if lay["repeat_main"]:
        same = rng.uniform(0, 1, (n, m)) < lay["repeat_main"]
        same[:, 0] = False
        cls = np.where(same, cls[:, :1], cls)
    # Slot 0 is the main object (large, near the centre, painted first);
    # slots 1-3 are smaller distractors of random classes painted on top.
    # A clearly dominant main object keeps the label learnable; the
    # distractors, occlusions and busy backgrounds keep it non-trivial.
    radius = (
        np.concatenate(
            [
                rng.uniform(*lay["main_radius"], (n, 1)),
                -np.sort(-rng.uniform(*lay["distractor_radius"], (n, m - 1)), axis=1),
            ],
            axis=1,
        )
        * size
    )
    cy = np.concatenate([rng.uniform(*lay["main_centre"], (n, 1)), rng.uniform(0.1, 0.9, (n, m - 1))], axis=1) * size
    cx = np.concatenate([rng.uniform(*lay["main_centre"], (n, 1)), rng.uniform(0.1, 0.9, (n, m - 1))], axis=1) * size
    angle = rng.uniform(-0.35, 0.35, (n, m))
    stretch = rng.uniform(0.85, 1.15, (n, m, 2))
    freq = rng.uniform(*lay["texture_freq"], (n, m))
    phase = rng.uniform(0, 2 * np.pi, (n, m))
    orient = rng.uniform(0, np.pi, (n, m))
    obj_c1, obj_c2 = _contrasting_pair(rng, (n, m))

    bg_type = rng.integers(0, 3, n)  # smooth noise, stripes, gradient
    bg_grid = rng.uniform(0, 255, (n, 5, 5, 3)).astype(np.float32)
    bg_c1, bg_c2 = _contrasting_pair(rng, (n,))
    if lay["palette"]:
        pal1, pal2 = _contrasting_pair(np.random.default_rng(12345), (lay["palette"],))
        pick = rng.integers(0, lay["palette"], (n, m + 1))
        obj_c1, obj_c2 = pal1[pick[:, :m]], pal2[pick[:, :m]]
        bg_c1, bg_c2 = pal2[pick[:, m]] * 0.5 + 64, pal1[pick[:, m]] * 0.5 + 64
        w = rng.uniform(0, 1, (n, 5, 5, 1)).astype(np.float32)
        bg_grid = bg_c1[:, None, None] * (1 - w) + bg_c2[:, None, None] * w
    bg_orient = rng.uniform(0, np.pi, n)
    bg_period = rng.uniform(0.15, 0.4, n) * size
    bg_phase = rng.uniform(0, 2 * np.pi, n)
    bg_mix = rng.uniform(0.3, 0.7, n)  # stripes contrast
    noise_seed = rng.integers(0, 2**31 - 1)

    # float32 halves the work of the per-pixel maths below.
    (radius, cy, cx, angle, stretch, freq, phase, orient, bg_orient, bg_period, bg_phase, bg_mix) = (
        a.astype(np.float32)
        for a in (radius, cy, cx, angle, stretch, freq, phase, orient, bg_orient, bg_period, bg_phase, bg_mix)
    )

    active = np.arange(m)[None, :] < n_obj[:, None]
    object_classes = np.where(active, cls, -1).astype(np.int32)

    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    inst_masks = np.empty((n, size, size), np.uint8)

    coords = np.arange(size, dtype=np.float32) + 0.5
    yy = coords[None, :, None]
    xx = coords[None, None, :]

    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        c = sl.stop - sl.start

        # ---- background ----------------------------------------------------
        img = np.empty((c, size, size, 3), np.float32)
        t_bg = bg_type[sl]
        sel = np.nonzero(t_bg == 0)[0]
        if sel.size:
            img[sel] = _upsample_bilinear(bg_grid[sl][sel], size)
        for kind in (1, 2):
            sel = np.nonzero(t_bg == kind)[0]
            if not sel.size:
                continue
            o = bg_orient[sl][sel][:, None, None]
            w = xx * np.cos(o) + yy * np.sin(o)
            if kind == 1:
                t = 0.5 + 0.5 * np.sin(
                    2 * np.pi * w / bg_period[sl][sel][:, None, None] + bg_phase[sl][sel][:, None, None]
                )
                t = t * bg_mix[sl][sel][:, None, None]
            else:
                lo = w.min(axis=(1, 2), keepdims=True)
                hi = w.max(axis=(1, 2), keepdims=True)
                t = (w - lo) / np.maximum(hi - lo, 1e-6)
            t = t[..., None].astype(np.float32)
            img[sel] = bg_c1[sl][sel][:, None, None] * (1 - t) + bg_c2[sl][sel][:, None, None] * t

        mask = np.zeros((c, size, size), np.uint8)
        inst = np.zeros((c, size, size), np.uint8)

        # ---- objects, one slot at a time (all images of the chunk) ---------
        for j in range(m):
            dy = yy - cy[sl, j][:, None, None]
            dx = xx - cx[sl, j][:, None, None]
            ca = np.cos(angle[sl, j])[:, None, None]
            sa = np.sin(angle[sl, j])[:, None, None]
            r = (radius[sl, j] * _AREA_SCALE[cls[sl, j]])[:, None, None]
            u = (ca * dx + sa * dy) / (r * stretch[sl, j, 0][:, None, None])
            v = (-sa * dx + ca * dy) / (r * stretch[sl, j, 1][:, None, None])
            for kk in range(k):
                sel = np.nonzero(active[sl, j] & (cls[sl, j] == kk))[0]
                if not sel.size:
                    continue
                us, vs = u[sel], v[sel]
                inside = _SHAPES[kk](us, vs)
                t = _texture(
                    _CLASS_TEXTURE[kk],
                    us,
                    vs,
                    freq[sl, j][sel][:, None, None],
                    phase[sl, j][sel][:, None, None],
                    orient[sl, j][sel][:, None, None],
                )[..., None].astype(np.float32)
                colour = obj_c1[sl, j][sel][:, None, None] * (1 - t) + obj_c2[sl, j][sel][:, None, None] * t
                img[sel] = np.where(inside[..., None], colour, img[sel])
                mask[sel] = np.where(inside, kk + 1, mask[sel])
                inst[sel] = np.where(inside, j + 1, inst[sel])

        # Sensor-like noise, seeded per chunk position so chunking is stable.
        noise_rng = np.random.default_rng([noise_seed, start])
        if lay["greyscale"]:
            img[...] = img.mean(axis=-1, keepdims=True)
        img += 4.0 * noise_rng.standard_normal(img.shape, dtype=np.float32)
        images[sl] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        masks[sl] = mask
        inst_masks[sl] = inst

    areas = np.stack([(inst_masks == j + 1).sum(axis=(1, 2)) for j in range(m)], axis=1).astype(np.int32)
    if lay["repeat_main"]:
        # Instances of one class add up: visible pixels per class from the per-slot areas.
        per_class = np.stack([np.where(object_classes == kk, areas, 0).sum(axis=1) for kk in range(k)], axis=1)
        labels = np.argmax(per_class, axis=1).astype(np.int32)
    else:
        # argmax returns the first maximum: ties go to the earlier painted object.
        labels = np.take_along_axis(object_classes, np.argmax(areas, axis=1)[:, None], axis=1)[:, 0].astype(np.int32)
    return {
        "images": images,
        "labels": labels,
        "masks": masks,
        "instance_masks": inst_masks,
        "object_classes": object_classes,
        "object_areas": areas,
    }
