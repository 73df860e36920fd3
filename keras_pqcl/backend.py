"""Backend differences in one place: replica count, cross-replica means, gradient steps.

TensorFlow under ``tf.distribute`` runs the step once per replica on a slice of the batch,
so batch statistics (DINO's center) must be all-reduced and hand-written losses divided by
the replica count (gradients are summed across replicas). JAX ``keras.distribution`` runs
one global program (GSPMD), so a batch mean is already global. Torch runs one device per
process; if ``torch.distributed`` is initialised (:func:`init_torch_distributed`, under
``torchrun``), means are all-reduced across processes and the train step sums the gradients
of ``loss / world_size`` over the processes, as TensorFlow's replicas do.
"""

import contextlib
import functools

import keras

BACKEND = keras.backend.backend()


def num_replicas_in_sync():
    """Replicas that each compute a slice of the global batch inside one step."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.distribute.get_strategy().num_replicas_in_sync
    if BACKEND == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return 1


def cross_replica_mean(x):
    """Mean of ``x`` over replicas (identity on a single device and under JAX GSPMD).

    Differentiable: the gradient of each replica's input is the mean over replicas of the
    output's gradient (TensorFlow's all-reduce defines it; under torch the all-reduce of
    ``torch.distributed.nn`` when ``x`` needs a gradient), as a synchronised BatchNorm needs.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_reduce(tf.distribute.ReduceOp.MEAN, x)
        return x
    if BACKEND == "torch":
        import torch.distributed as dist

        # A "meta" tensor is Keras inferring shapes on one process: nothing to reduce.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and x.device.type != "meta":
            if x.requires_grad:
                from torch.distributed.nn.functional import all_reduce

                return all_reduce(x) / dist.get_world_size()
            x = x.clone()
            dist.all_reduce(x)
            return x / dist.get_world_size()
    return x


def cross_replica_concat(x):
    """``x`` of every replica concatenated along axis 0, in replica order: the global batch.

    For state that must see the whole batch (DenseCL's queues). Identity on a single device
    and under JAX GSPMD, where a batch is already global. No gradient flows through it.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            return context.all_gather(tf.stop_gradient(x), axis=0)
        return x
    if BACKEND == "torch":
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = x.detach().contiguous()
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x)
            return torch.cat(parts, dim=0)
    return x


# Gradients travel in flat buckets of about this size: one ``all_reduce`` per bucket instead
# of one per tensor (a ViT-S has ~150 parameter tensors), without a second full copy of every
# gradient in one buffer. 25 MB is also DDP's default bucket size.
_BUCKET_BYTES = 25 * 2**20


def distribution_scope():
    """Spread the batch over every local accelerator: MirroredStrategy (TF), DataParallel (JAX).

    Returns a context manager under which the model must be created.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # A multi-process run already has its distribution (init_jax_distributed: every
        # process feeds its own share), which a default DataParallel must not replace.
        if keras.distribution.distribution() is None and len(jax.devices()) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel())
    elif backend == "tensorflow":
        import tensorflow as tf

        if _TF_STRATEGY is not None:
            return _TF_STRATEGY.scope()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy().scope()
    return contextlib.nullcontext()


@contextlib.contextmanager
def process_local():
    """Run what is inside on this process alone, with no distribution: models built there
    have variables of their own on this process's devices, and their calls involve no other
    process (e.g. the chief's k-NN evaluation of a copy of the backbone, which the others do
    not run). Under JAX the global distribution is lifted for the duration; TensorFlow's
    callbacks already run outside the strategy's scope, and torch has no such state."""
    if BACKEND != "jax":
        yield
        return
    current = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def init_torch_distributed(timeout_s=1800.0):
    """Join the process group ``torchrun`` describes; a no-op without one.

    Call it at the top of a training script, before any model or tensor is created: on a GPU
    it also makes ``cuda:LOCAL_RANK`` the current device, which Keras' default ``"cuda"``
    device then refers to. Reads the variables ``torchrun`` sets: ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Uses NCCL when CUDA is available and
    gloo otherwise.

    Args:
        timeout_s: seconds a rendezvous or collective waits for the other processes before
            it fails (so a dead peer stops the run with an error instead of hanging it).
            Generous by default: rank 0 may be busy alone (checkpointing, k-NN evaluation)
            while the others wait at the next step's all-reduce.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` when ``WORLD_SIZE`` is unset or 1.

    Raises:
        RuntimeError: with ``WORLD_SIZE > 1`` under a Keras backend other than torch (use
            ``tf.distribute`` or ``keras.distribution`` there).
    """
    import datetime
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if BACKEND != "torch":
        raise RuntimeError(
            f"WORLD_SIZE={world} asks for torch.distributed, but the Keras backend is {BACKEND!r}; "
            "set KERAS_BACKEND=torch, or use tf.distribute / keras.distribution instead."
        )
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


# Environment read by :func:`init_jax_distributed` when an argument is None, before Slurm's.
COORDINATOR_ENV = "KERAS_PQCL_COORDINATOR"
NUM_PROCESSES_ENV = "KERAS_PQCL_NUM_PROCESSES"
PROCESS_ID_ENV = "KERAS_PQCL_PROCESS_ID"


def _env_int(name):
    import os

    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer; fix or unset it.") from None


def init_jax_distributed(coordinator=None, num_processes=None, process_id=None):
    """Join a multi-process JAX run (``jax.distributed``) and train data-parallel over every
    device of every process; a no-op for one process.

    Each argument left None is read from the environment: ``KERAS_PQCL_COORDINATOR``
    (``HOST:PORT`` of process 0), ``KERAS_PQCL_NUM_PROCESSES``, ``KERAS_PQCL_PROCESS_ID``,
    then Slurm's ``SLURM_NTASKS`` / ``SLURM_PROCID`` (under ``srun`` JAX also finds the
    coordinator, the first node of the step, by itself). Call it first in a training
    script, before any JAX array or Keras model exists.

    Afterwards the distribution is ``keras.distribution.DataParallel`` over all global
    devices with ``auto_shard_dataset=False``: every process feeds only its own share of
    each global batch (``B / num_processes`` examples, e.g. from ``pretrain_dataset(...,
    shard=process_shard())``), and Keras' JAX trainer assembles the global batch from the
    processes' shares in process order (``jax.make_array_from_process_local_data``). The
    step then runs as one GSPMD program over the global batch, so centers, queues and
    gradients are global with no code of ours. On CPU the cross-process collectives use
    gloo (JAX has none on CPU otherwise). A peer that never joins fails the rendezvous
    after JAX's ``initialization_timeout`` (300 s); one that dies mid-run is detected by
    the coordinator's heartbeat (100 s).

    Returns:
        ``(process_id, num_processes)``; ``(0, 1)`` when the process count is unset or 1.

    Raises:
        ValueError: a process count above 1 under a Keras backend other than JAX, a
            missing coordinator or process id outside Slurm, or an id outside
            ``[0, num_processes)``.
    """
    import os

    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV)
    slurm = num_processes is None and _env_int("SLURM_NTASKS") is not None
    if slurm:
        num_processes = _env_int("SLURM_NTASKS")
    if num_processes is None or num_processes <= 1:
        return 0, 1
    if BACKEND != "jax":
        raise ValueError(
            f"num_processes={num_processes} asks for jax.distributed, but the Keras backend is {BACKEND!r}; "
            "set KERAS_BACKEND=jax (TensorFlow: TF_CONFIG, torch: torchrun)."
        )
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV)
    if process_id is None and slurm:
        process_id = _env_int("SLURM_PROCID")
    coordinator = coordinator or os.environ.get(COORDINATOR_ENV) or None
    if not slurm and (coordinator is None or process_id is None):
        raise ValueError(
            f"a {num_processes}-process JAX run needs the coordinator HOST:PORT and this process's id: pass "
            f"coordinator= and process_id=, or set {COORDINATOR_ENV} and {PROCESS_ID_ENV}."
        )
    if process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id={process_id} must lie in [0, {num_processes}); fix --process-id or {PROCESS_ID_ENV}."
        )
    import jax

    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Before the CPU client exists: without it a CPU computation spanning processes fails.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not jax.distributed.is_initialized():
        try:
            keras.distribution.initialize(coordinator, num_processes, process_id)
        except Exception as error:  # JAX's own errors: a rendezvous that timed out, a bad address
            where = coordinator or "the coordinator Slurm names"
            reason = " ".join(str(error).split())[:300]
            raise ValueError(
                f"could not join the {num_processes}-process JAX run at {where} as process {process_id}: {reason}. "
                "Start every process with the same coordinator and process count, each with its own id."
            ) from None
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    )
    return jax.process_index(), jax.process_count()


# The strategy of :func:`init_tf_multiworker`, once created: the process's place in the run
# is known outside its scope too.
_TF_STRATEGY = None


def init_tf_multiworker(timeout_s=1800.0):
    """``tf.distribute.MultiWorkerMirroredStrategy`` over the workers ``TF_CONFIG`` (or
    Slurm) describes; None for a single process.

    Call it first in a training script, before TensorFlow runs any op, then create and
    compile the model under ``strategy.scope()`` and feed :func:`per_worker_dataset`. The
    train step is the one of ``MirroredStrategy``: each replica's loss divided by the global
    replica count, gradients summed over all replicas of all workers, centers and queues
    all-reduced (:func:`cross_replica_mean`, :func:`cross_replica_concat`). Collectives use
    NCCL on GPUs and TensorFlow's ring implementation (gRPC) on CPUs.

    ``TF_CONFIG`` is e.g. ``{"cluster": {"worker": ["host0:port", "host1:port"]}, "task":
    {"type": "worker", "index": 1}}``; without it, under ``srun`` with more than one task,
    Slurm's variables are read (``SlurmClusterResolver``).

    Args:
        timeout_s: seconds a collective waits for the other workers before it fails, so a
            dead peer stops the run with an error instead of hanging it.

    Returns:
        The strategy, or None when neither ``TF_CONFIG`` nor Slurm names several workers.

    Raises:
        ValueError: ``TF_CONFIG`` is not JSON, or it asks for workers under a Keras backend
            other than TensorFlow.
    """
    global _TF_STRATEGY
    config = _tf_config()
    slurm = not config.get("cluster") and (_env_int("SLURM_NTASKS") or 1) > 1
    if not config.get("cluster") and not slurm:
        return None
    if BACKEND != "tensorflow":
        raise ValueError(
            f"TF_CONFIG / Slurm name several workers for tf.distribute, but the Keras backend is {BACKEND!r}; "
            "set KERAS_BACKEND=tensorflow (JAX: init_jax_distributed, torch: torchrun)."
        )
    import tensorflow as tf

    if _TF_STRATEGY is not None:
        return _TF_STRATEGY
    cluster = tf.distribute.cluster_resolver
    resolver = cluster.SlurmClusterResolver() if slurm else cluster.TFConfigClusterResolver()
    implementation = tf.distribute.experimental.CommunicationImplementation
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if tf.config.list_physical_devices("GPU") else implementation.RING,
        timeout_seconds=timeout_s,
    )
    _TF_STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    return _TF_STRATEGY


def _tf_config():
    """The parsed ``TF_CONFIG`` (``{}`` when unset), or a one-line ValueError when it is not a
    JSON object with an object ``cluster``."""
    import json
    import os

    raw = os.environ.get("TF_CONFIG") or "{}"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("cluster") or {}, dict):
        raise ValueError(
            f'TF_CONFIG={raw!r} is not JSON of the form {{"cluster": {{...}}, "task": {{...}}}}; fix or unset it.'
        )
    return config


def launch_request():
    """``"NAME=value"`` of the first launch variable that asks for more than one process
    (torchrun's ``WORLD_SIZE``, ``KERAS_PQCL_NUM_PROCESSES``, a ``TF_CONFIG`` cluster of
    several chief and worker tasks), or None; a malformed one raises a one-line ValueError."""
    import os

    for name in ("WORLD_SIZE", NUM_PROCESSES_ENV):
        if (_env_int(name) or 1) > 1:
            return f"{name}={os.environ[name]}"
    cluster = _tf_config().get("cluster") or {}
    if sum(len(cluster.get(job) or ()) for job in ("chief", "worker")) > 1:
        return f"TF_CONFIG={os.environ['TF_CONFIG']}"
    return None


def per_worker_dataset(dataset_fn, strategy=None):
    """``fit``'s input under ``MultiWorkerMirroredStrategy`` when each worker reads its own
    shard: ``dataset_fn()`` builds this worker's part of every global batch (e.g.
    ``pretrain_dataset(..., shard=process_shard())``, ``B / N`` examples).

    TensorFlow's own ``experimental_distribute_dataset`` would treat each worker's batch as
    the global batch and split it again; here every worker's batches are used as they are
    (split further only over the worker's own replicas, in order), so the global batch is
    the workers' shares in worker order, as one process reads it.
    """
    import tensorflow as tf

    strategy = strategy or _TF_STRATEGY or tf.distribute.get_strategy()
    workers = max(process_count(), 1)

    def per_replica(context):
        ds = _bools_as_uint8(dataset_fn())
        local = context.num_replicas_in_sync // workers
        if local > 1:
            # Replicas of a worker take consecutive batches of its dataset.
            ds = ds.rebatch(_static_batch(ds) // local)
        return ds

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(per_replica, options)


def _static_batch(ds):
    import tensorflow as tf

    sizes = {s.shape[0] for s in tf.nest.flatten(ds.element_spec) if hasattr(s, "shape") and s.shape.rank}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"per_worker_dataset needs batches of one static size, got leading sizes {sizes}.")
    return sizes.pop()


def _bools_as_uint8(ds):
    """Boolean entries of ``ds`` cast to uint8 (TensorFlow cannot all-reduce booleans)."""
    import tensorflow as tf

    if not any(s.dtype == tf.bool for s in tf.nest.flatten(ds.element_spec) if hasattr(s, "dtype")):
        return ds
    return ds.map(
        lambda *x: tf.nest.map_structure(
            lambda t: tf.cast(t, tf.uint8) if t.dtype == tf.bool else t, x[0] if len(x) == 1 else x
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def process_index():
    """This process's index among the training processes (0 without multi-process training).

    torch: the ``torch.distributed`` rank; JAX: ``jax.process_index()``; TensorFlow: the
    worker's task index under ``MultiWorkerMirroredStrategy``.
    """
    return _process()[0]


def process_count():
    """Number of training processes (1 without multi-process training)."""
    return _process()[1]


def is_chief():
    """True in the one process that writes logs, checkpoints and summaries (process 0)."""
    return process_index() == 0


def process_shard():
    """``keras_pqcl.data.Shard`` of this process: which part of each global batch it feeds."""
    from keras_pqcl.data.sharding import Shard

    index, count = _process()
    return Shard(index, count)


def _process():
    if BACKEND == "torch":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    elif BACKEND == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        strategy = _TF_STRATEGY or tf.distribute.get_strategy()
        resolver = getattr(strategy, "cluster_resolver", None)
        if resolver is not None and resolver.cluster_spec().jobs:
            return _tf_worker(resolver)
    return 0, 1


def _tf_worker(resolver):
    """``(index, count)`` of a TF_CONFIG worker; a ``chief`` task, when present, is index 0."""
    spec = resolver.cluster_spec()
    chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
    count = chiefs + (spec.num_tasks("worker") if "worker" in spec.jobs else 0)
    index = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
    return index, count


def _buckets(tensors, bucket_bytes):
    """Indices of ``tensors`` grouped into buckets of one dtype and device, in order, each
    holding at most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    buckets, open_buckets = [], {}
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        size = t.numel() * t.element_size()
        bucket = open_buckets.get(key)
        if bucket is None or (bucket[0] and bucket[1] + size > bucket_bytes):
            bucket = open_buckets[key] = [[], 0]
            buckets.append(bucket[0])
        bucket[0].append(i)
        bucket[1] += size
    return buckets


def broadcast_from_chief(variables, bucket_bytes=_BUCKET_BYTES):
    """Give every process process 0's values of ``variables`` (Keras variables, in the same
    order on every process); a no-op in a run of one process.

    The processes build the model from the same seed, so their values should already agree;
    this makes sure they do, whatever code ran on the chief alone before (anything that
    drew from a random generator there would otherwise start the processes apart, and
    identical gradient sums would keep them apart for the whole run, with no error).
    torch: bucketed ``broadcast``; JAX: ``multihost_utils.broadcast_one_to_all``. A
    ``MultiWorkerMirroredStrategy`` already broadcasts worker 0's initial value of every
    variable it creates, and a resumed run loads the same checkpoint file everywhere, so
    nothing is left to do under TensorFlow.
    """
    if process_count() < 2:
        return
    if BACKEND == "jax":
        import numpy as np
        from jax.experimental import multihost_utils

        values = multihost_utils.broadcast_one_to_all([np.asarray(v.value) for v in variables])
        for v, value in zip(variables, values):
            v.assign(np.asarray(value))
        return
    if BACKEND != "torch":
        return
    import torch
    import torch.distributed as dist

    tensors = [v.value for v in variables]
    with torch.no_grad():
        for idx in _buckets(tensors, bucket_bytes):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            dist.broadcast(flat, src=0)
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                tensors[i].copy_(piece.view(tensors[i].shape))


def any_process(flag):
    """True in every process when ``flag`` is true in any of them; ``flag`` itself in a run
    of one process. Every process must call it at the same point."""
    if process_count() < 2:
        return bool(flag)
    if BACKEND == "jax":
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(np.asarray(multihost_utils.process_allgather(np.int32(1 if flag else 0))).any())
    if BACKEND == "tensorflow":
        return float(_tf_vote()(1.0 if flag else 0.0)) > 0
    import torch
    import torch.distributed as dist

    # A CUDA tensor under NCCL, which cannot reduce CPU tensors; gloo takes either.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@functools.cache
def _tf_vote():
    """``vote(x) -> sum of x over every replica of every worker``, one compiled function (run
    eagerly, a collective of ``MultiWorkerMirroredStrategy`` is slow and warns each time)."""
    import tensorflow as tf

    strategy = _TF_STRATEGY

    @tf.function(input_signature=[tf.TensorSpec((), tf.float32)])
    def vote(x):
        votes = strategy.run(tf.identity, args=(x,))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, votes, axis=None)

    return vote


def barrier():
    """Wait until every process gets here; a no-op in a run of one process."""
    if process_count() < 2:
        return
    if BACKEND == "torch":
        import torch.distributed as dist

        dist.barrier()
    elif BACKEND == "jax":
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("keras_pqcl.barrier")
    else:
        any_process(False)


def _all_reduce_sum(tensors, bucket_bytes=_BUCKET_BYTES):
    """``tensors`` summed over the ranks of ``torch.distributed``, one ``all_reduce`` per
    bucket. Returns new tensors of the same shapes (views into the reduced buckets); the
    inputs are not modified. Every rank must pass the same shapes and dtypes, in order."""
    import torch
    import torch.distributed as dist

    out = [None] * len(tensors)
    for idx in _buckets(tensors, bucket_bytes):
        parts = [tensors[i] for i in idx]
        flat = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(flat)
        for i, piece in zip(idx, flat.split([p.numel() for p in parts])):
            out[i] = piece.view(tensors[i].shape)
    return out


def _torch_sync_step(grads, variables, loss, logs, tracked, world):
    """Sums the gradients over the ranks and averages the logged loss terms, in one bucketed
    all-reduce.

    The gradients are those of ``loss / world`` (each rank's mean over its ``B / world``
    examples), so their sum is the gradient of the global-batch mean loss: the one-process
    gradient. After the sum every rank holds identical gradients, hence takes an identical
    optimizer step. A variable without gradient on some rank (``None``) travels as zeros, with
    a presence flag: it stays ``None`` only if no rank has a gradient for it, so every rank
    hands the optimizer the same list.

    The loss and the tracked log terms (names in ``tracked``) are per-rank batch means; their
    mean over the ranks is the global-batch mean, which is what the metrics then record (as
    Keras' summed metric variables do under ``tf.distribute``). Other logs (schedule values,
    untracked diagnostics) stay as computed on this rank.

    Args:
        grads: ``[tensor | None]``, one per variable of ``variables``.
        variables: the trainable Keras variables.
        loss: scalar tensor, this rank's batch-mean loss.
        logs: ``{name: value}`` from ``ssl_forward``.
        tracked: names whose values are averaged (the model's metric trackers).
        world: number of ranks.

    Returns:
        ``(grads, loss, logs)``: summed gradients (``None`` where no rank had one), the
        global-mean loss and the logs with the tracked terms averaged.
    """
    import torch

    with torch.no_grad():
        present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=loss.device)
        filled = [g if g is not None else torch.zeros_like(v.value) for g, v in zip(grads, variables)]
        names = [n for n, x in logs.items() if n in tracked and torch.is_tensor(x) and x.is_floating_point()]
        means = [loss.detach(), *(logs[n].detach() for n in names)]
        reduced = _all_reduce_sum([*filled, present, *means])
        n = len(filled)
        summed, present, means = reduced[:n], reduced[n], reduced[n + 1 :]
        grads = [g if p > 0 else None for g, p in zip(summed, present.tolist())]
        logs = dict(logs)
        for name, value in zip(names, means[1:]):
            logs[name] = value / world
        return grads, means[0] / world, logs


def distributable(dataset, model):
    """``dataset`` made safe to feed ``model.fit`` under a multi-replica ``tf.distribute``
    strategy (the one ``model`` was created under).

    Keras' TensorFlow trainer builds a distributed model by MEAN-reducing the first batch
    across replicas, and TensorFlow cannot add booleans: iBOT's ``global_masks`` would stop
    ``fit`` with "Value for attr 'T' of bool". Boolean entries travel as uint8 instead; the
    models cast masks back to bool. Under a ``MultiWorkerMirroredStrategy`` of several
    workers ``dataset`` is this worker's share of every global batch (see
    :func:`per_worker_dataset`). Anything else is returned unchanged.
    """
    if BACKEND != "tensorflow":
        return dataset
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", tf.distribute.get_strategy())
    if strategy.num_replicas_in_sync < 2 or not isinstance(dataset, tf.data.Dataset):
        return dataset
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and process_count() > 1:
        return per_worker_dataset(lambda: dataset, strategy)
    return _bools_as_uint8(dataset)


def ema_update(pairs, momentum):
    """``t <- m t + (1 - m) s`` for every ``(t, s)`` variable pair, in the variables' dtype.

    Torch runs eagerly, so one fused ``_foreach_lerp_`` over all tensors replaces a Python
    loop of small kernels; the other backends compile the loop into the step.
    """
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            teachers = [t.value for t, _ in pairs]
            students = [s.value.detach() for _, s in pairs]
            weight = 1.0 - momentum.to(teachers[0].dtype) if torch.is_tensor(momentum) else 1.0 - momentum
            torch._foreach_lerp_(teachers, students, weight)
        return
    from keras import ops

    for t, s in pairs:
        m = ops.cast(momentum, t.dtype)
        t.assign(t * m + ops.stop_gradient(ops.cast(s, t.dtype)) * (1.0 - m))


# --------------------------------------------------------------------------- train steps
# Every self-supervised model implements, once and in keras.ops only:
#   ssl_forward(data, step, training) -> (loss, logs)   forward + loss + center updates
#   update_teacher(step)                                  EMA of the teacher
#   collect_logs(loss, logs) -> dict                      metrics update
# The classes below add only what differs between backends: how gradients are taken and how
# state is threaded. ``step`` is the optimizer's iteration count *before* this update, the
# index ``it`` of the reference schedules.


class _TensorFlowTrainStep:
    def train_step(self, data):
        import tensorflow as tf

        data = _unpack(data)
        step = tf.identity(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            loss, logs = self.ssl_forward(data, step, training=True)
            # Gradients are summed over replicas; divide so they average instead.
            scaled = self.optimizer.scale_loss(loss / num_replicas_in_sync())
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self.update_teacher(step)
        logs = self.collect_logs(loss, logs)
        if _tf_multi_worker():
            # Keras reduces every log over the workers with ``reduce(MEAN, v, axis=0)``,
            # which fails on a scalar ("Invalid reduction dimension 0 for input with 0
            # dimensions"); as a (1,) vector each log becomes the mean over the replicas.
            logs = {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}
        return logs

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras' TensorFlow trainer builds a distributed model from the first batch, MEAN-
        # reduced across replicas as one nested structure. MultiWorkerMirroredStrategy's
        # reduce takes one value only ("Attempt to convert a value ({'global_crops':
        # PerReplica...}) with an unsupported type dict"), and its collectives refuse uint8
        # (iBOT's masks). The build needs shapes only: use this worker's first replica's
        # share, with no collective at all.
        import tensorflow as tf

        strategy = self._distribute_strategy
        if strategy is not None and iterator is not None and strategy.num_replicas_in_sync > 1:
            for _, _, it in iterator:
                batch = next(it)
                break
            flat = tf.nest.flatten(batch)
            if flat and all(isinstance(x, tf.distribute.DistributedValues) for x in flat):
                batch = tf.nest.map_structure(lambda x: strategy.experimental_local_results(x)[0], batch)
            with strategy.scope():
                self._symbolic_build(data_batch=batch)
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


class _TorchTrainStep:
    # Under torch.distributed every rank runs this step on its B / world share of the global
    # batch B. Global (identical on every rank): the gradients after the all-reduce below,
    # hence the student weights and optimizer state; the teacher (an EMA of identical
    # students); the centers (``cross_replica_mean`` of the teacher logits in the losses);
    # DenseCL's queues (``cross_replica_concat`` of the keys); the logged loss terms; the
    # heads' BatchStatNorm statistics (all-reduced, as the reference's SyncBatchNorm).
    # Per-rank: the forward pass itself and a ResNet's BatchNorm statistics and moving
    # averages (as in DenseCL's reference; ViTs have none).
    def train_step(self, data):
        import torch

        data = _unpack(data)
        step = self.optimizer.iterations.value.detach().clone()
        self.zero_grad()
        loss, logs = self.ssl_forward(data, step, training=True)
        world = num_replicas_in_sync()
        # As on TensorFlow's replicas: divide by the rank count here, sum the gradients below.
        self.optimizer.scale_loss(loss / world).backward()
        variables = self.trainable_variables
        grads = [v.value.grad for v in variables]
        if world > 1:
            # Before the optimizer: its per-tensor clipping must see the global gradient.
            grads, loss, logs = _torch_sync_step(grads, variables, loss, logs, getattr(self, "trackers", {}), world)
        with torch.no_grad():
            self.optimizer.apply(grads, variables)
            self.update_teacher(step)
        return self.collect_logs(loss, logs)


class _JaxTrainStep:
    def train_step(self, state, data):
        import jax

        data = _unpack(data)
        tv, ntv, ov, mv = state
        trainable, non_trainable = self.trainable_variables, self.non_trainable_variables
        optimizer_vars, metric_vars = self.optimizer.variables, self.metrics_variables

        def forward(tv_values, ntv_values):
            # Every variable the shared code reads must be mapped, the step counter included.
            mapping = [*zip(trainable, tv_values), *zip(non_trainable, ntv_values), *zip(optimizer_vars, ov)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                loss, logs = self.ssl_forward(data, self.optimizer.iterations, training=True)
                scaled = self.optimizer.scale_loss(loss)
            new_ntv = [scope.get_current_value(v) for v in non_trainable]
            return scaled, (loss, logs, new_ntv)

        grad_fn = jax.value_and_grad(forward, has_aux=True)
        (_, (loss, logs, ntv)), grads = grad_fn(tv, ntv)
        # optimizer.stateless_apply, with the model's non-trainable state mapped too: the
        # learning-rate and weight-decay schedules read the run length from the model's clock.
        mapping = [*zip(trainable, tv), *zip(optimizer_vars, ov), *zip(non_trainable, ntv)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.optimizer.apply(grads)
        tv = [_current(scope, v, x) for v, x in zip(trainable, tv)]
        new_ov = [_current(scope, v, x) for v, x in zip(optimizer_vars, ov)]
        # Old optimizer state is mapped so that ``iterations`` still reads this step's index.
        mapping = [*zip(trainable, tv), *zip(non_trainable, ntv), *zip(optimizer_vars, ov), *zip(metric_vars, mv)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.update_teacher(self.optimizer.iterations)
            logs = self.collect_logs(loss, logs)
        ntv = [scope.get_current_value(v) for v in non_trainable]
        mv = [scope.get_current_value(v) for v in metric_vars]
        return logs, (tv, ntv, new_ov, mv)


def _current(scope, variable, old):
    value = scope.get_current_value(variable)
    return old if value is None else value


def _tf_multi_worker():
    """True under a ``MultiWorkerMirroredStrategy`` of more than one worker."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and process_count() > 1


def _unpack(data):
    x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    return x


TrainStep = {
    "tensorflow": _TensorFlowTrainStep,
    "torch": _TorchTrainStep,
    "jax": _JaxTrainStep,
}.get(BACKEND)
if TrainStep is None:  # numpy/openvino backends cannot train
    TrainStep = type("TrainStep", (), {})
