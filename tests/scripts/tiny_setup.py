"""Tiny DINO setup shared by the integration tests and their subprocess scripts.

Importable both from the test modules (as ``tests.scripts.tiny_setup``) and from scripts
run as ``python tests/scripts/<name>.py`` (as ``tiny_setup``: their own folder is on the path).
"""

import numpy as np

BATCH = 4
GLOBAL_SIZE = 32
LOCAL_SIZE = 16
N_LOCAL = 2
HEAD = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def gratings(n, size, seed=0):
    """``n`` structured RGB images: oriented sine gratings with per-image frequency/colour."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        angle = np.pi * i / n
        freq = 2 + i % 3
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + seed)
        colour = np.array([np.cos(i), np.sin(i), np.cos(2 * i)])
        out.append(wave[..., None] * colour)
    return np.stack(out).astype("float32")


def crops(n=8, n_local=N_LOCAL, seed=0, noise=0.1):
    """Batch-able dict ``{"global_crops": (n, 2, 32, 32, 3), "local_crops": (n, L, 16, 16, 3)}``.

    Without local crops (``n_local=0``) the JAX/TF train step is about half as costly to
    compile (one backbone call fewer); the saving and distribution tests use that.
    """
    rng = np.random.default_rng(seed)
    g = gratings(n, GLOBAL_SIZE, seed)
    small = gratings(n, LOCAL_SIZE, seed)
    views = [g + noise * rng.normal(size=g.shape), g[:, ::-1] + noise * rng.normal(size=g.shape)]
    data = {"global_crops": np.stack(views, 1).astype("float32")}
    if n_local:  # no "local_crops" key at all otherwise (it is optional)
        locs = [small + noise * rng.normal(size=small.shape) for _ in range(n_local)]
        data["local_crops"] = np.stack(locs, 1).astype("float32")
    return data


def dataset(data, batch=BATCH):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(data).batch(batch, drop_remainder=True)


def backbone(drop_path_rate=0.0):
    import keras_pqcl as kp

    return kp.backbones.vit_tiny(
        8, depth=2, embed_dim=32, num_heads=2, image_size=GLOBAL_SIZE, drop_path_rate=drop_path_rate
    )


def dino(drop_path_rate=0.0, **kwargs):
    import keras_pqcl as kp

    return kp.models.DINO(backbone(drop_path_rate), **{**HEAD, **kwargs})


def pqcl(drop_path_rate=0.0, **kwargs):
    """iBOT+PQCL on a sin-cos backbone with a mask token (three centers)."""
    import keras_pqcl as kp

    net = kp.backbones.vit_tiny(
        8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        image_size=GLOBAL_SIZE,
        drop_path_rate=drop_path_rate,
        pos_embed="sincos",
        use_mask_token=True,
    )
    return kp.models.PQCL(net, base="ibot", **{**HEAD, **kwargs})


def pqcl_inputs(data, seed=0):
    """Adds iBOT ``global_masks`` and PQCL ``query_coords`` for the crops of ``data``."""
    rng = np.random.default_rng(seed)
    n, n_global = data["global_crops"].shape[:2]
    n_local, grid, local_grid = data["local_crops"].shape[1], GLOBAL_SIZE // 8, LOCAL_SIZE // 8
    data = dict(data)
    data["global_masks"] = rng.random((n, n_global, grid, grid)) < 0.3
    data["query_coords"] = rng.uniform(0, grid - 1, (n, n_global, n_local, local_grid**2, 2)).astype("float32")
    return data


def probe_images(n=2 * BATCH, seed=123):
    """Fixed inputs for comparing outputs: (n, 32, 32, 3) float32.

    ``n = 2 * BATCH`` is the teacher's batch in a train step (2 global crops): eager JAX
    forward passes of that shape share compiled ops across the test modules.
    """
    return np.random.default_rng(seed).normal(size=(n, GLOBAL_SIZE, GLOBAL_SIZE, 3)).astype("float32")


def tracked(model):
    """``[(name, variable)]``: the student and teacher networks and every center of a DINO or
    iBOT+PQCL model (seed-generator states left out), for comparing runs variable by variable."""
    out = []
    for prefix, layers in (
        ("student", (model.student_backbone, model.student_head)),
        ("teacher", (model.teacher_backbone, model.teacher_head)),
    ):
        for layer in layers:
            for v in layer.weights:
                if "seed_generator" not in v.path:
                    out.append((f"{prefix}/{v.path.split('/', 1)[1]}", v))
    # One center per term: CLS, and for iBOT+PQCL the masked patches' and the queries'.
    names = {"cls": "center", "mim": "center_patch", "query": "center_query"}
    out += [(names[t.log_name], t.center) for t in model.terms if t.log_name in names]
    return out
