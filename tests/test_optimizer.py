"""AdamW vs a NumPy re-implementation of torch.optim.AdamW with DINO's conventions."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_pqcl.optimizers.adamw import AdamW, dino_adamw
from keras_pqcl.schedules import WarmupCosine

from tests import helpers as H

to_numpy = H.to_numpy
pytestmark = H.IGNORE_NUMPY2_COPY_WARNING

# name, shape, decayed? (torch DINO groups: ndim >= 2 and not a bias)
# Few distinct shapes: on JAX each new shape compiles every op of the update again.
SPECS = [
    ("kernel", (2, 4), True),
    ("bias", (4,), False),
    ("scale", (4,), False),  # a LayerNorm gamma: 1-D
    ("proj_bias", (2, 4), False),  # 2-D but named like a bias
    ("cls_token", (1, 2, 4), True),  # 3-D like cls_token / pos_embed
    ("gain", (2, 4), True),  # a trainable weight-norm gain (2-D)
    ("tiny_grad", (4,), False),  # gradients ~1e-8: sqrt(v_hat) ~ eps shows where eps goes
]
BIG = 0  # index of the variable whose gradient is made large enough to be clipped
TINY = 6
# float32 bias corrections 1 - 0.999^t lose ~1e-5 relative accuracy for small t
# (torch computes them in float64), hence atol 1e-5 on O(0.1) updates.
TOL = dict(rtol=1e-5, atol=1e-5)


def make_variables(seed=0):
    rng = np.random.default_rng(seed)
    values = [rng.normal(size=shape).astype("float32") for _, shape, _ in SPECS]
    variables = [keras.Variable(v, name=name) for v, (name, _, _) in zip(values, SPECS)]
    return values, variables


def make_grads(steps=3, seed=1):
    rng = np.random.default_rng(seed)
    grads = []
    for _ in range(steps):
        gs = [rng.normal(size=shape).astype("float32") for _, shape, _ in SPECS]
        gs[BIG] = gs[BIG] * 100.0  # norm ~ 280 >> clip
        gs[TINY] = gs[TINY] * 1e-8
        grads.append(gs)
    return grads


def numpy_adamw(values, grads, lrs, wds, clip=3.0, frozen=(), freeze_until=0, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW, with DINO's per-tensor clipping and ``grad = None`` freezing.

    A variable whose gradient is None is skipped entirely (no moments, no decay, and its
    own step counter does not advance, as in torch).
    Returns per-step lists of (params, m, v).
    """
    params = [np.asarray(v, np.float64).copy() for v in values]
    state = [dict(m=np.zeros_like(p), v=np.zeros_like(p), step=0) for p in params]
    history = []
    for t, gs in enumerate(grads):
        for i, g in enumerate(gs):
            if i in frozen and t < freeze_until:
                continue
            g = np.asarray(g, np.float64)
            if clip is not None:
                coef = clip / (np.sqrt(np.sum(g**2)) + 1e-6)
                if coef < 1:
                    g = g * coef
            st = state[i]
            st["step"] += 1
            if SPECS[i][2]:
                params[i] = params[i] * (1 - lrs[t] * wds[t])
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g**2
            bc1 = 1 - b1 ** st["step"]
            bc2 = 1 - b2 ** st["step"]
            denom = np.sqrt(st["v"]) / math.sqrt(bc2) + eps
            params[i] = params[i] - lrs[t] / bc1 * st["m"] / denom
        history.append([(p.copy(), s["m"].copy(), s["v"].copy()) for p, s in zip(params, state)])
    return history


def dino_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0.0):
    """DINO utils.cosine_scheduler, restated."""
    warmup_iters = warmup_epochs * niter
    warmup = np.linspace(start_warmup_value, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def run(optimizer, variables, grads):
    out = []
    for gs in grads:
        optimizer.apply([ops.convert_to_tensor(g) for g in gs], variables)
        out.append([to_numpy(v).copy() for v in variables])
    return out


def _moments(optimizer, variable):
    index = optimizer._get_variable_index(variable)
    return to_numpy(optimizer._m[index]), to_numpy(optimizer._v[index])


def test_adamw_matches_torch_formulas_with_clipping_and_decay_groups():
    values, variables = make_variables()
    grads = make_grads()
    assert np.linalg.norm(grads[0][BIG]) > 100  # clipping is exercised
    opt = AdamW(learning_rate=0.1, weight_decay=0.5, clip_per_tensor=3.0)
    got = run(opt, variables, grads)
    ref = numpy_adamw(values, grads, [0.1] * 3, [0.5] * 3)
    assert int(to_numpy(opt.iterations)) == 3
    for step in range(3):
        for i, (name, _, _) in enumerate(SPECS):
            np.testing.assert_allclose(got[step][i], ref[step][i][0], **TOL, err_msg=f"{name} step {step + 1}")
    for i, variable in enumerate(variables):
        m, v = _moments(opt, variable)
        np.testing.assert_allclose(m, ref[-1][i][1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, ref[-1][i][2], rtol=1e-5, atol=1e-9)


def test_decay_groups_are_the_ones_of_dino():
    values, variables = make_variables()
    opt = AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.build(variables)
    assert opt._decays == [decayed for _, _, decayed in SPECS]
    # With zero gradients only the decoupled decay moves the parameters: p * (1 - lr wd).
    zero = [[np.zeros(shape, "float32") for _, shape, _ in SPECS]]
    got = run(opt, variables, zero)[0]
    for value, new, (name, _, decayed) in zip(values, got, SPECS):
        expected = value * (1 - 0.05) if decayed else value
        np.testing.assert_allclose(new, expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_schedules_are_evaluated_at_each_step():
    values, variables = make_variables(2)
    grads = make_grads(seed=3)
    lr = WarmupCosine(0.2, 0.01, total_steps=3, warmup_steps=1, warmup_start=0.05)
    wd = WarmupCosine(0.04, 0.4, total_steps=3)
    lrs = dino_cosine_scheduler(0.2, 0.01, 3, 1, warmup_epochs=1, start_warmup_value=0.05)
    wds = dino_cosine_scheduler(0.04, 0.4, 3, 1)
    assert len(lrs) == len(wds) == 3 and len(set(np.round(wds, 6))) == 3
    opt = AdamW(learning_rate=lr, weight_decay=wd)
    got = run(opt, variables, grads)
    ref = numpy_adamw(values, grads, lrs, wds)
    for step in range(3):
        for i, (name, _, _) in enumerate(SPECS):
            np.testing.assert_allclose(got[step][i], ref[step][i][0], **TOL, err_msg=f"{name} step {step + 1}")
    np.testing.assert_allclose(float(to_numpy(opt.current_weight_decay())), 0.4, rtol=1e-6)  # past the end


def test_freeze_until_step():
    values, variables = make_variables(4)
    grads = make_grads(steps=4, seed=5)
    frozen = (0, 5)  # the clipped kernel and the (decayed) gain, like DINO's last layer
    opt = AdamW(learning_rate=0.1, weight_decay=0.5)
    opt.build(variables)
    opt.freeze([variables[i] for i in frozen], until_step=2)
    got = []
    for step, gs in enumerate(grads):
        opt.apply([ops.convert_to_tensor(g) for g in gs], variables)
        got.append([to_numpy(v).copy() for v in variables])
        if step < 2:  # first two steps: untouched, moments too
            for i in frozen:
                np.testing.assert_array_equal(got[-1][i], values[i])
                m, v = _moments(opt, variables[i])
                np.testing.assert_array_equal(m, np.zeros_like(m))
                np.testing.assert_array_equal(v, np.zeros_like(v))
    ref = numpy_adamw(values, grads, [0.1] * 4, [0.5] * 4, frozen=frozen, freeze_until=2)
    for step in range(4):
        for i, (name, _, _) in enumerate(SPECS):
            np.testing.assert_allclose(got[step][i], ref[step][i][0], **TOL, err_msg=f"{name} step {step + 1}")
    for i in frozen:  # updated from step 3 on
        assert not np.allclose(got[2][i], values[i])
        m, v = _moments(opt, variables[i])
        np.testing.assert_allclose(m, ref[-1][i][1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, ref[-1][i][2], rtol=1e-5, atol=1e-9)


def test_against_torch_adamw():
    torch = pytest.importorskip("torch")
    values, variables = make_variables(6)
    grads = make_grads(steps=4, seed=7)
    frozen, until = (5,), 2
    lr = WarmupCosine(0.1, 0.01, total_steps=4, warmup_steps=2, warmup_start=0.02)
    wd = WarmupCosine(0.04, 0.4, total_steps=4)
    lrs = dino_cosine_scheduler(0.1, 0.01, 4, 1, warmup_epochs=2, start_warmup_value=0.02)
    wds = dino_cosine_scheduler(0.04, 0.4, 4, 1)

    params = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in values]
    decay = [p for p, spec in zip(params, SPECS) if spec[2]]
    no_decay = [p for p, spec in zip(params, SPECS) if not spec[2]]
    topt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    for t, gs in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = torch.tensor(g, dtype=torch.float64)
            norm = p.grad.norm()
            coef = 3.0 / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)
            if i in frozen and t < until:
                p.grad = None
        for k, group in enumerate(topt.param_groups):
            group["lr"] = lrs[t]
            if k == 0:
                group["weight_decay"] = wds[t]
        topt.step()

    opt = AdamW(learning_rate=lr, weight_decay=wd, clip_per_tensor=3.0)
    opt.build(variables)
    opt.freeze([variables[i] for i in frozen], until_step=until)
    got = run(opt, variables, grads)[-1]
    for (name, _, _), value, p in zip(SPECS, got, params):
        np.testing.assert_allclose(value, p.detach().numpy(), **TOL, err_msg=name)


def test_no_clipping_when_disabled():
    values, variables = make_variables(8)
    grads = make_grads(steps=2, seed=9)
    opt = AdamW(learning_rate=0.01, weight_decay=0.0, clip_per_tensor=None)
    got = run(opt, variables, grads)
    ref = numpy_adamw(values, grads, [0.01] * 2, [0.0] * 2, clip=None)
    # Adam is scale-invariant after step 1 only up to eps, so compare the moments too.
    for i in range(len(SPECS)):
        np.testing.assert_allclose(got[-1][i], ref[-1][i][0], **TOL)
    m, _ = _moments(opt, variables[BIG])
    np.testing.assert_allclose(m, ref[-1][BIG][1], rtol=1e-5)


def test_config_round_trip_with_schedules():
    lr = WarmupCosine(1e-3, 1e-6, total_steps=100, warmup_steps=10)
    wd = WarmupCosine(0.04, 0.4, total_steps=100)
    opt = AdamW(learning_rate=lr, weight_decay=wd, clip_per_tensor=2.0)
    config = opt.get_config()
    clone = AdamW.from_config(config)
    assert isinstance(clone.decay, WarmupCosine)
    assert clone.decay.get_config() == wd.get_config()
    assert clone.clip_per_tensor == 2.0 and clone.epsilon == 1e-8
    assert (clone.beta_1, clone.beta_2) == (0.9, 0.999)
    for step in (0, 5, 50, 99):
        np.testing.assert_allclose(float(to_numpy(clone.decay(step))), float(to_numpy(wd(step))))


def test_dino_adamw_schedules():
    epochs, niter = 3, 4
    opt = dino_adamw(batch_size=512, epochs=epochs, steps_per_epoch=niter, warmup_epochs=1)
    lrs = dino_cosine_scheduler(5e-4 * 512 / 256, 1e-6, epochs, niter, warmup_epochs=1)
    wds = dino_cosine_scheduler(0.04, 0.4, epochs, niter)
    steps = ops.convert_to_tensor(np.arange(epochs * niter))
    np.testing.assert_allclose(to_numpy(opt._learning_rate(steps)), lrs, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(to_numpy(opt.decay(steps)), wds, rtol=1e-5, atol=1e-9)
    assert opt.clip_per_tensor == 3.0 and opt.epsilon == 1e-8
    with pytest.raises(ValueError, match="positive"):
        dino_adamw(batch_size=64, epochs=0, steps_per_epoch=10)
