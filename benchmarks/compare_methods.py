"""Does PQCL improve dense features over its base without hurting global ones? The method comparison.

Pre-trains DINO, iBOT, DINO+PQCL, iBOT+PQCL and ADCLR (ViTs) and DenseCL and MCL (ResNets)
from the same seed and budget on the embedded ``synthetic_scenes`` (the ``tiny`` recipe family:
same data and schedule; the ViT methods also share backbone and crops, only the method differs),
then scores each transfer backbone (the teacher; DenseCL's query encoder) on held-out splits
(probe train: seed 1, probe test: seed 2; pre-training uses seed 0) with

* k-NN top-1 on the CLS token (a ResNet's pooled C5) (k = 20, T = 0.07),
* a linear probe on the last blocks' CLS (top-1, the best of a learning-rate sweep),
* a dense linear probe on the patch tokens (a ResNet's C5 map) (mIoU over background + 10 classes),
* fine-tuned segmentation mIoU, the seeds' headline dense metric: the whole backbone and an
  UperNet decoder fine-tuned on the probe-train masks and scored on the probe-test masks
  (:func:`keras_pqcl.tasks.finetune_run.finetune_segmentation`, short fixed settings:
  ``FINETUNE``; ``--finetune-epochs 0`` leaves it out),

plus a random-init backbone (built exactly like the recipes' student; one ViT, one ResNet) as the
floor, and the pre-training images/s. Several seeds give the spread (mean ± std). Writes ``compare.md``,
``compare.json`` and ``compare.png`` (bar chart) to ``--output``, after every job. Each job's scores
are kept in ``--output``/results/; a later run with the same settings reuses them, so a stopped
comparison goes on where it stopped and more seeds can be added (``--no-reuse`` runs everything;
``--report-only`` runs nothing and tabulates what is saved). A finished pre-training of the same
recipe is reused too, so probing again with other settings (``--probe-size 64``) costs only the
probes.

    python benchmarks/compare_methods.py --quick                    # smoke run, minutes
    python benchmarks/compare_methods.py --seeds 0,1                # benchmarks/results/ (90 min, 2 cores)
    python benchmarks/compare_methods.py --seeds 0,1 --probe-size 64  # re-probe them on an 8 x 8 grid
    python benchmarks/compare_methods.py --family tiny_long         # another recipe family

Run under any backend (``KERAS_BACKEND``); every pre-training runs in its own subprocess so
that one method's compiled functions and memory never affect the next.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _subprocess import run_worker  # noqa: E402

PROBE_TRAIN_SEED, PROBE_TEST_SEED = 1, 2
#: (row label, method name in the recipe family: "<family>" or "<family>_<suffix>")
METHODS = (
    ("DINO", ""),
    ("iBOT", "ibot"),
    ("DINO+PQCL", "dino_pqcl"),
    ("iBOT+PQCL", "pqcl"),
    ("ADCLR", "adclr"),
    ("DenseCL", "densecl"),
    ("MCL", "mcl"),
)
#: The fixed fine-tuning settings of every row (besides ``--finetune-epochs``): one decoder
#: and one learning rate for all, as the papers compare methods.
FINETUNE = dict(decoder="upernet", channels=64, batch_size=32, lr=1e-3, layer_decay=0.65, weight_decay=0.05)
BASE_OF = {"DINO+PQCL": "DINO", "iBOT+PQCL": "iBOT", "ADCLR": "DINO"}
#: the random-init floor of each backbone family: (row label, method suffix whose recipe builds it)
FLOORS = (("random init", ""), ("random init (ResNet)", "densecl"))
CONVNET = {"DenseCL", "MCL"}


def recipe_name(family, suffix):
    return family if not suffix else f"{family}_{suffix}"


def probe_splits(recipe, n_train, n_test):
    """Held-out labelled images and masks at the recipe data's image size."""
    import keras_pqcl as kp
    from keras_pqcl.data.sources import parse_synthetic

    if not recipe.data.startswith("synthetic_scenes"):
        raise SystemExit(
            f"the probes use held-out synthetic_scenes images; recipe {recipe.name!r} trains on "
            f"{recipe.data!r}. Use a synthetic_scenes recipe."
        )
    _, size = parse_synthetic(recipe.data)  # the pre-training images' side
    splits = {}
    for split, n, seed in (("train", n_train, PROBE_TRAIN_SEED), ("test", n_test, PROBE_TEST_SEED)):
        data = kp.data.synthetic_scenes(n, image_size=size, seed=seed)
        splits[split] = data
    return splits


def evaluate(backbone, splits, image_size, args, linear=True):
    """k-NN, linear (unless ``linear=False``) and dense scores of one backbone on the probe splits."""
    from keras_pqcl import eval as kpe

    train, test = splits["train"], splits["test"]
    scores = {}
    knn = kpe.knn_evaluate(
        backbone, (train["images"], train["labels"]), (test["images"], test["labels"]), image_size=image_size
    )
    scores["knn_top1"] = knn["top1"]
    if linear:
        # The reference sweeps the classifier's learning rate and keeps the best; its default
        # (1e-3 x batch/256) barely moves in the few hundred steps of 1,000 probe images.
        scores["linear_top1"] = kpe.linear_probe(
            backbone,
            (train["images"], train["labels"]),
            (test["images"], test["labels"]),
            epochs=args.linear_epochs,
            image_size=image_size,
            lr=[float(lr) for lr in args.linear_lrs.split(",")],
        )["top1"]
    dense = kpe.dense_probe(
        backbone,
        train["images"],
        train["masks"],
        test["images"],
        test["masks"],
        num_classes=11,
        epochs=args.dense_epochs,
        image_size=image_size,
    )
    scores.update(dense_miou=dense["miou"], dense_pixel_acc=dense["pixel_acc"])
    if args.finetune_epochs:
        # Last: fine-tuning changes the backbone's weights.
        scores["finetune_miou"] = finetune(backbone, splits, args)
    return scores


def finetune(backbone, splits, args):
    """Fine-tuned segmentation mIoU (%) of ``backbone``: ``FINETUNE`` on the probe-train masks,
    scored on the probe-test masks."""
    from keras_pqcl.tasks.finetune_run import finetune_segmentation

    train, test = splits["train"], splits["test"]
    output = os.path.join(
        args.output, "finetune", f"{args.recipe}_seed{args.seed}{'_random' if args.random_init else ''}"
    )
    summary = finetune_segmentation(
        backbone,
        {"images": train["images"], "masks": train["masks"]},
        {"images": test["images"], "masks": test["masks"]},
        num_classes=11,
        output=output,
        epochs=args.finetune_epochs,
        seed=args.seed,
        verbose=0,
        overwrite=True,
        **FINETUNE,
    )
    return 100.0 * summary["val"]["mIoU"]


def worker(args):
    """One (method, seed): pre-train (or build the random-init floor) and evaluate; prints JSON."""
    import keras

    import keras_pqcl as kp
    from keras_pqcl.training import build_backbone

    recipe = kp.load_recipe(args.recipe).replace(seed=args.seed, epochs=args.epochs)
    if args.steps_per_epoch:
        recipe = recipe.replace(steps_per_epoch=args.steps_per_epoch)
    keras.utils.set_random_seed(args.seed)
    size = recipe.crops.get("global_size") or recipe.crops["image_size"]  # MCL's montages: image_size
    if args.random_init:
        backbone, images_per_s = build_backbone(recipe, size), None
    else:
        run_dir = os.path.join(args.output, f"{args.recipe}_seed{args.seed}")
        summary = finished_pretraining(run_dir, recipe) if args.reuse else None
        if summary is None:
            summary = kp.pretrain(recipe, run_dir, verbose=0)
        # DenseCL transfers its query encoder (the paper's); the others their EMA teacher.
        backbone = keras.saving.load_model(summary["transfer_backbone"])
        images_per_s = summary["images_per_second"]
    # The probes may read larger images than the crops (a finer token grid for the dense probe);
    # the ViT interpolates its position table.
    probe_size = args.probe_size or size
    scores = evaluate(backbone, probe_splits(recipe, args.probe_train, args.probe_test), probe_size, args)
    print(json.dumps(dict(scores, images_per_s=images_per_s)))


def finished_pretraining(run_dir, recipe):
    """The summary of a pre-training of exactly ``recipe`` that finished in ``run_dir``, else None."""
    try:
        with open(os.path.join(run_dir, "recipe.json")) as f:
            same = f.read() == recipe.to_json()
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if same and os.path.exists(summary["transfer_backbone"]) else None


def table(rows, args):
    """Markdown table of mean ± std per method, and the gap to its base on dense mIoU (paired by seed)."""

    def cell(label, metric):
        runs = rows[label]
        if not runs or runs[0].get(metric) is None:
            return "-"
        values = [r[metric] for r in runs]
        return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    finetuned = any(r.get("finetune_miou") is not None for runs in rows.values() for r in runs)
    lines = [
        f"Recipe family `{args.family}`, {args.epochs} epochs, seeds {args.seeds}; probes on "
        f"{args.probe_train} / {args.probe_test} held-out synthetic_scenes images"
        f"{f' at {args.probe_size} px' if args.probe_size else ''}; backend "
        f"{os.environ.get('KERAS_BACKEND', 'tensorflow')}.",
        "",
        "| method | seeds | k-NN top-1 % | linear top-1 % | dense mIoU % | dense mIoU vs base "
        + ("| fine-tuned seg. mIoU % | fine-tuned vs base " if finetuned else "")
        + "| pre-training images/s |",
        "|---|---|---|---|---|---|" + ("---|---|" if finetuned else "") + "---|",
    ]
    for label in rows:
        gaps = f"{cell(label, 'finetune_miou')} | {gap(rows, label, 'finetune_miou')} | " if finetuned else ""
        lines.append(
            f"| {label} | {len(rows[label])} | {cell(label, 'knn_top1')} | {cell(label, 'linear_top1')} | "
            f"{cell(label, 'dense_miou')} | {gap(rows, label, 'dense_miou')} | {gaps}{cell(label, 'images_per_s')} |"
        )
    if finetuned:
        lines += [
            "",
            f"Fine-tuned: {args.finetune_epochs} epochs of {FINETUNE['decoder']} "
            f"(channels {FINETUNE['channels']}, batch {FINETUNE['batch_size']}, lr {FINETUNE['lr']}, layer decay "
            f"{FINETUNE['layer_decay']}, weight decay {FINETUNE['weight_decay']}), whole backbone trained, on the "
            "probe-train masks, mIoU on the probe-test masks.",
        ]
    return "\n".join(lines)


def gap(rows, label, metric):
    """``metric`` of ``label`` minus its base's, paired by seed (mean ± std), or ``-``."""
    base = BASE_OF.get(label)
    # Paired by seed: the spread of the differences, not of the two means, is what says
    # whether a gap is stable.
    paired = {r["seed"]: r.get(metric) for r in rows.get(base, [])}
    diffs = [
        r[metric] - paired[r["seed"]]
        for r in rows[label]
        if paired.get(r["seed"]) is not None and r.get(metric) is not None
    ]
    if not diffs:
        return "-"
    spread = f" ± {np.std(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{np.mean(diffs):+.1f}{spread} vs {base}"


def chart(rows, path):
    """Bar chart of each metric's mean ± std per method, with the values written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("knn_top1", "k-NN top-1 %"), ("linear_top1", "linear top-1 %"), ("dense_miou", "dense mIoU %"))
    if any(r.get("finetune_miou") is not None for runs in rows.values() for r in runs):
        metrics += (("finetune_miou", "fine-tuned seg. mIoU %"),)
    labels = list(rows)
    # Grey: the floors; blue: the ViT methods; orange: the ResNet ones (their own floor).
    colors = [
        "#999999" if label.startswith("random init") else "#d9822b" if label in CONVNET else "#3b75af"
        for label in labels
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8))
    for ax, (metric, title) in zip(axes, metrics):
        values = [[r.get(metric, np.nan) for r in rows[label]] for label in labels]
        means = [np.mean(v) for v in values]
        stds = [np.std(v) if len(v) > 1 else 0 for v in values]
        ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=colors)
        for i, mean in enumerate(means):
            ax.text(i, mean + stds[i], f"{mean:.1f}", ha="center", va="bottom", fontsize=7)
        # The gaps that matter here are a few points on a score of 15-45: start the axis near
        # the lowest bar (the values are printed) instead of at zero.
        low, high = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 0.25 * (high - low) - 1.0), high + 0.12 * (high - low) + 1.0)
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.text(
        0.5,
        0.005,
        "mean ± std over seeds; the y axes start near the lowest bar, not at 0",
        ha="center",
        va="bottom",
        fontsize=7,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny", help="recipe family: tiny -> tiny, tiny_ibot, ...")
    parser.add_argument("--methods", default=None, help="comma-separated row labels (default: all)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=None, dest="steps_per_epoch")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--probe-train", type=int, default=1000, dest="probe_train")
    parser.add_argument("--probe-test", type=int, default=500, dest="probe_test")
    parser.add_argument("--linear-epochs", type=int, default=50, dest="linear_epochs")
    parser.add_argument(
        "--linear-lrs",
        default="1e-3,1e-2,1e-1,1",
        dest="linear_lrs",
        help="comma-separated learning rates of the linear probe; the best is reported",
    )
    parser.add_argument("--dense-epochs", type=int, default=20, dest="dense_epochs")
    parser.add_argument(
        "--finetune-epochs",
        type=int,
        default=10,
        dest="finetune_epochs",
        help="epochs of the fine-tuned segmentation column (0: leave the column out)",
    )
    parser.add_argument(
        "--probe-size",
        type=int,
        default=None,
        dest="probe_size",
        help="image side the probes read (default: the recipe's global crop side); a larger "
        "side gives the dense probe a finer token grid",
    )
    parser.add_argument("--output", default=os.path.join("runs", "compare_methods"))
    parser.add_argument("--quick", action="store_true", help="2 epochs of 4 steps, small probes, 2 fine-tuning epochs")
    parser.add_argument(
        "--report-only",
        action="store_true",
        dest="report_only",
        help="run nothing: write the table and chart from the saved scores of these methods and seeds",
    )
    parser.add_argument(
        "--no-reuse",
        action="store_false",
        dest="reuse",
        help="re-run every job (and pre-training), even those an earlier run finished with the same settings",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--random-init", action="store_true", dest="random_init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps_per_epoch = 2, 4
        args.probe_train, args.probe_test, args.linear_epochs, args.dense_epochs = 200, 100, 5, 3
        args.finetune_epochs = min(args.finetune_epochs, 2)
    if args.worker:
        return worker(args)

    os.makedirs(args.output, exist_ok=True)
    chosen = set(args.methods.split(",")) if args.methods else None
    labels = [label for label, _ in METHODS if chosen is None or label in chosen]
    jobs = [
        (label, recipe_name(args.family, suffix), True)
        for label, suffix in FLOORS
        if suffix == "" and set(labels) - CONVNET or suffix and set(labels) & CONVNET
    ]
    jobs += [(label, recipe_name(args.family, suffix), False) for label, suffix in METHODS if label in labels]
    rows = {label: [] for label, _, _ in jobs}
    # Seeds outside, methods inside: a run stopped early still holds whole seeds.
    for seed in args.seeds.split(","):
        for label, recipe, random_init in jobs:
            result, ran = run_job(args, label, recipe, seed, random_init, run=not args.report_only)
            if result:
                rows[label].append(result)
            if ran:  # rewritten after every job that ran, so a long run can be read (and stopped) at any point
                write_report({lab: runs for lab, runs in rows.items() if runs}, args, final=False)
    rows = {label: runs for label, runs in rows.items() if runs}
    if not rows:
        raise SystemExit(
            f"no scores saved in {os.path.join(args.output, 'results')} for these methods, seeds and "
            "settings; run without --report-only."
            if args.report_only
            else "every job failed (their errors are above); nothing to compare."
        )
    text = write_report(rows, args, final=True)
    print("\n" + text)
    print(f"\nchart: {os.path.join(args.output, 'compare.png')}")


def job_settings(args, recipe, seed, random_init):
    """Everything a job's scores depend on; a cached result is reused only when all of it matches."""
    settings = dict(
        recipe=recipe,
        seed=int(seed),
        random_init=random_init,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        probe_train=args.probe_train,
        probe_test=args.probe_test,
        linear_epochs=args.linear_epochs,
        linear_lrs=args.linear_lrs,
        dense_epochs=args.dense_epochs,
        backend=os.environ.get("KERAS_BACKEND", "tensorflow"),
    )
    if args.probe_size:  # absent by default, so that results saved before the option still match
        settings["probe_size"] = args.probe_size
    if args.finetune_epochs:  # likewise: saved results without the column match --finetune-epochs 0
        settings["finetune"] = dict(FINETUNE, epochs=args.finetune_epochs)
    return settings


def run_job(args, label, recipe, seed, random_init, run=True):
    """``(scores, ran)`` of one (method, seed): the scores from ``<output>/results/`` when an earlier
    run with the same settings left them there (unless ``--no-reuse``), else from a fresh worker
    process (None when it failed, or when ``run`` is false); ``ran`` says whether a worker ran."""
    settings = job_settings(args, recipe, seed, random_init)
    probe = f"_probe{args.probe_size}" if args.probe_size else ""
    name = f"{recipe}_seed{seed}{'_random' if random_init else ''}{probe}"
    path = os.path.join(args.output, "results", f"{name}.json")
    if args.reuse and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("settings") == settings:
            print(f"  {label:12s} seed {seed}: reused {path}", file=sys.stderr)
            return cached["scores"], False
    if not run:
        return None, False
    cmd = [
        os.path.abspath(__file__),
        "--worker",
        "--recipe",
        recipe,
        "--seed",
        str(seed),
        "--epochs",
        str(args.epochs),
        "--probe-train",
        str(args.probe_train),
        "--probe-test",
        str(args.probe_test),
        "--linear-epochs",
        str(args.linear_epochs),
        "--linear-lrs",
        args.linear_lrs,
        "--dense-epochs",
        str(args.dense_epochs),
        "--finetune-epochs",
        str(args.finetune_epochs),
        "--output",
        os.path.abspath(args.output),
    ]
    if args.steps_per_epoch:
        cmd += ["--steps-per-epoch", str(args.steps_per_epoch)]
    if args.probe_size:
        cmd += ["--probe-size", str(args.probe_size)]
    if not args.reuse:
        cmd.append("--no-reuse")
    if random_init:
        cmd.append("--random-init")
    result = run_worker(cmd, f"{label} (seed {seed})")
    if result:
        result = dict(result, seed=int(seed))
        print(
            f"  {label:12s} seed {seed}: "
            + ", ".join(f"{k} {v:.1f}" for k, v in result.items() if v is not None and k != "seed"),
            file=sys.stderr,
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_text(path, json.dumps(dict(settings=settings, scores=result), indent=2))
    return result, True


def write_text(path, text):
    """Write through a temporary file and a rename, so that a stopped run never leaves half a file.
    (Not keras_pqcl's helper: importing the package would load a backend into this parent process.)"""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(rows, args, final):
    """``compare.md``, ``compare.json`` and ``compare.png`` for the runs so far; returns the table."""
    text = table(rows, args)
    if not final:
        text += "\n\n(partial: the run is still going)"
    write_text(os.path.join(args.output, "compare.md"), text + "\n")
    write_text(os.path.join(args.output, "compare.json"), json.dumps(rows, indent=2))
    if rows:
        chart(rows, os.path.join(args.output, "compare.png"))
    return text


if __name__ == "__main__":
    main()
