"""The AdamW update of :class:`~keras_pqcl.optimizers.AdamW` as torch's fused kernel.

Torch runs the optimizer eagerly: the per-tensor ``update_step`` makes ~20 passes over every
parameter-sized tensor (and evaluates the weight-decay schedule once per tensor). Here the
per-tensor clipping is one multi-tensor norm and scale, and the rest of the update (decay,
moments, bias corrections, step) is ``torch._fused_adamw_``, which reads and writes each
parameter, gradient and moment once. Its arithmetic is ``torch.optim.AdamW``'s (the
reference's optimizer): ``p *= 1 - lr wd``; ``m = lerp(m, g, 1 - b1)``;
``v = b2 v + (1 - b2) g^2``; ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``, with the
bias corrections ``bc = 1 - b^t`` in float64.
"""

import torch


@torch.no_grad()
def fused_adamw_step(optimizer, grads, variables, learning_rate):
    """One AdamW step of ``optimizer`` on the ``variables`` that have a gradient.

    Variables registered with ``optimizer.freeze`` are left untouched while frozen; once
    unfrozen, their step count starts from 1 (torch's per-parameter ``step``).

    Args:
        optimizer: a built :class:`~keras_pqcl.optimizers.AdamW`.
        grads: ``[torch.Tensor | None]``, one per variable.
        variables: the trainable Keras variables.
        learning_rate: the optimizer's learning rate (float, tensor or variable).
    """
    iterations = optimizer.iterations.value
    freeze_until = optimizer.freeze_until.value
    frozen_now = bool(iterations < freeze_until)
    groups = {True: ([], [], [], [], []), False: ([], [], [], [], [])}  # decayed? -> p, g, m, v, step
    step = None
    for grad, variable in zip(grads, variables):
        if grad is None:
            continue
        index = optimizer._get_variable_index(variable)
        dtype = variable.value.dtype
        if step is None:
            step = (iterations + 1).to(torch.float32)
        if index in optimizer._frozen_indices:
            if frozen_now:
                continue
            t = (iterations - freeze_until + 1).to(torch.float32)
        else:
            t = step
        params, gs, ms, vs, steps = groups[bool(optimizer._decays[index] and optimizer.decay)]
        params.append(variable.value)
        gs.append(grad.to(dtype))
        ms.append(optimizer._m[index].value)
        vs.append(optimizer._v[index].value)
        steps.append(t)
    groups = {k: g for k, g in groups.items() if g[0]}
    if not groups:
        return
    if optimizer.clip_per_tensor:
        # g * min(1, clip / (||g|| + 1e-6)) per tensor, every norm in one multi-tensor kernel.
        for params, gs, *_ in groups.values():
            norms = torch.stack(torch._foreach_norm(gs)).to(gs[0].dtype)
            coefs = torch.clamp(optimizer.clip_per_tensor / (norms + 1e-6), max=1.0)
            gs[:] = torch._foreach_mul(gs, list(coefs.unbind()))
    lr = float(_value(learning_rate))
    decay = float(_value(optimizer.current_weight_decay())) if optimizer.decay else 0.0
    for decayed, (params, gs, ms, vs, steps) in groups.items():
        torch._fused_adamw_(
            params,
            gs,
            ms,
            vs,
            [],
            steps,
            lr=lr,
            beta1=optimizer.beta_1,
            beta2=optimizer.beta_2,
            weight_decay=decay if decayed else 0.0,
            eps=optimizer.epsilon,
            amsgrad=False,
            maximize=False,
        )


def _value(x):
    """A Keras variable's tensor, or ``x`` itself."""
    return getattr(x, "value", x)
