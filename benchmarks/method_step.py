"""Images/s of one training step of each method, per Keras backend, and what PQCL costs.

Each row builds its model from the method's paper recipe (``recipes/*_vit_small.py``: ViT-S/16,
its head size and temperatures) through the recipe runner's registry, then times ``fit``
steps on one synthetic batch holding every key the method reads (crops, iBOT masks, PQCL
query coordinates). Default: batch 8, 2 x 224 global crops and 1 x 96 local crop, the PQCL
README setting, so each plug-in is compared with its base on the same crops; extra rows give
iBOT with its paper's 10 local crops, and ADCLR beside DINO with 4 local crops.

    python benchmarks/method_step.py                          # all backends, all rows
    python benchmarks/method_step.py --backends torch --steps 2
    python benchmarks/method_step.py --quick                  # tiny ViT, a smoke test

"x base" is the plug-in's step time over its base's, from the same backend in the same run
(machines are shared and noisy: compare ratios, not absolute numbers across runs). "GFLOP" is
the step's operation count as XLA counts it (the JAX step lowered, not run, in one more
process; the model is the same on every backend), and "x base (FLOP)" the plug-in's count over
its base's: the step-time ratio a backend reaches when it runs plug-in and base equally well.
``--no-flops`` skips that count.

With ``--reference PATH`` (a folder holding the official DINO code and its
``time_official_step.py``), the official step is timed in a subprocess before and after our
rows, with each DINO row's settings, and the DINO rows get "x official": our images/s over the
mean of the two official runs of this invocation. The official script times DINO only, so the
other methods get no "x official" (the table header says so).

    python benchmarks/method_step.py --reference ../shared/refs/dino_official
    python benchmarks/method_step.py --quick --backends torch --rows 0,1 --reference PATH  # smoke test
"""

import argparse
import json
import os
import sys

from _official import Bracket, check_reference, machine
from _subprocess import run_worker
from _timing import print_table, run_rows, selected_rows, step_parser, time_fit_steps, xla_step_flops

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# (row label, method, paper recipe, local crops, label of the base row for "x base")
ROWS = (
    ("DINO", "dino", "dino_vit_small", 1, None),
    ("DINO+PQCL", "dino_pqcl", "dino_pqcl_vit_small", 1, "DINO"),
    ("iBOT", "ibot", "ibot_vit_small", 1, None),
    ("iBOT+PQCL", "pqcl", "pqcl_vit_small", 1, "iBOT"),
    ("iBOT, 10 local (paper)", "ibot", "ibot_vit_small", 10, "iBOT"),
    ("DINO, 4 local", "dino", "dino_vit_small", 4, None),
    ("ADCLR, 4 query crops", "adclr", "adclr_vit_small", 4, "DINO, 4 local"),
)


def make_batch(recipe, batch_size, rng):
    """One batch with every key any method reads, shaped for ``recipe``'s crops."""

    crops, p = recipe.crops, recipe.patch_size
    n_global, n_local = crops.get("n_global", 2), crops["n_local"]
    size, local = crops["global_size"], crops["local_size"]
    grid, local_grid = size // p, local // p
    return {
        "global_crops": rng.normal(size=(batch_size, n_global, size, size, 3)).astype("float32"),
        "local_crops": rng.normal(size=(batch_size, n_local, local, local, 3)).astype("float32"),
        # iBOT's expected masked share: half the crops at U(0.1, 0.5).
        "global_masks": rng.random((batch_size, n_global, grid, grid)) < 0.15,
        "query_coords": rng.uniform(0, grid - 1, (batch_size, n_global, n_local, local_grid**2, 2)).astype("float32"),
    }


def row_recipe(index, quick, match_official):
    """The recipe of row ``index``; ``quick``: a tiny model and crops. With ``match_official``
    the quick model is the official script's smallest preset (vit_tiny) with its fixed head
    (hidden 2048, bottleneck 256), so that the official step can be run with the same settings."""
    from keras_pqcl.recipe import load_recipe

    _, _, recipe_name, n_local, _ = ROWS[index]
    recipe = load_recipe(recipe_name).derive(crops=dict(n_local=n_local))
    if quick:
        head = dict(out_dim=256) if match_official else dict(out_dim=256, hidden_dim=64, bottleneck_dim=32)
        if "patch_out_dim" in recipe.method_args:
            head["patch_out_dim"] = 256
        small = (
            dict(backbone="vit_tiny")
            if match_official
            else dict(backbone_args=dict(embed_dim=32, depth=2, num_heads=2))
        )
        recipe = recipe.derive(patch_size=8, method_args=head, crops=dict(global_size=32, local_size=16), **small)
    return recipe


def official_settings(recipe, batch):
    """The official script's settings for a DINO row's ``recipe``."""
    crops = recipe.crops
    return dict(
        arch=recipe.backbone,
        patch=recipe.patch_size,
        batch=batch,
        global_size=crops["global_size"],
        local_size=crops["local_size"],
        locals=crops["n_local"],
        out_dim=recipe.method_args["out_dim"],
    )


def build_row(args, index):
    """``(recipe, compiled model, batch)`` of row ``index``."""
    import keras
    import numpy as np

    from keras_pqcl import optimizers
    from keras_pqcl.training import METHODS, build_backbone

    keras.utils.set_random_seed(0)
    recipe = row_recipe(index, args.quick, args.match_official)
    backbone = build_backbone(recipe, recipe.crops["global_size"])
    model = METHODS[ROWS[index][1]].model(recipe, backbone)
    model.compile(optimizer=optimizers.dino_adamw(args.batch, 100, 1000), jit_compile="auto")
    return recipe, model, make_batch(recipe, args.batch, np.random.default_rng(0))


def count_flops(args):
    """Runs in a JAX process: XLA's FLOP count of every selected row's step, as one JSON line."""
    labels = [row[0] for row in ROWS]
    flops = {labels[i]: xla_step_flops(*build_row(args, i)[1:]) for i in selected_rows(args, labels)}
    print(json.dumps(flops))


def worker(args):
    import keras

    label, _, _, n_local, _ = ROWS[args.row]
    recipe, model, batch = build_row(args, args.row)
    compile_s, step_s = time_fit_steps(model, batch, args.steps)
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "row": label,
                "crops": f"2x{recipe.crops['global_size']} + {n_local}x{recipe.crops['local_size']}",
                "out_dim": recipe.method_args["out_dim"],
                "images_per_s": args.batch / step_s,
                "step_s": step_s,
                "compile_s": compile_s,
            }
        )
    )


def main():
    parser = step_parser(__doc__, batch=8)
    parser.add_argument(
        "--reference",
        default=None,
        metavar="PATH",
        help="a checkout of the official DINO code holding time_official_step.py: its DINO "
        "step is timed before and after ours, and the DINO rows get 'x official'",
    )
    parser.add_argument("--no-flops", action="store_true", dest="no_flops", help="skip XLA's FLOP count")
    parser.add_argument("--match-official", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", dest="count_flops", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count_flops:
        return count_flops(args)
    if args.worker:
        return worker(args)

    labels = [row[0] for row in ROWS]
    bracket, official_of = None, {}
    if args.reference:
        bracket = Bracket(check_reference(args.reference), args.steps)
        for i in selected_rows(args, labels):
            if ROWS[i][1] == "dino":
                recipe = row_recipe(i, args.quick, True)
                if recipe.crops.get("n_global", 2) == 2:  # the official script has 2 global crops
                    official_of[labels[i]] = official_settings(recipe, args.batch)
        bracket.before(list(official_of.values()))
    results = run_rows(__file__, labels, args, ["--match-official"] if args.reference else [])
    if bracket:
        bracket.after()
    flops = {}
    if not args.no_flops:
        extra = (["--rows", args.rows] if args.rows else []) + (["--quick"] if args.quick else [])
        extra += ["--match-official"] if args.reference else []
        flops = (
            run_worker(
                [__file__, "--count-flops", "--batch", str(args.batch), *extra], "XLA FLOP count", KERAS_BACKEND="jax"
            )
            or {}
        )
    for result in results:
        result["base"] = ROWS[result["index"]][4]

    step = {(r["backend"], r["row"]): r["step_s"] for r in results}
    if args.quick:
        model = "vit_tiny/8 (official head sizes)" if args.reference else "tiny ViT/8 (dim 32, depth 2)"
    else:
        model = "ViT-S/16"
    print(f"\n### One training step per method, {machine()}\n")
    print(
        f"- settings: {model}, batch {args.batch}, paper recipes' heads and crops as listed, "
        f"median of {args.steps} steps after the first"
    )
    print("- ratios are within this invocation: 'x base' = the plug-in's step time / its base's, same backend")
    if bracket:
        print("\n".join(bracket.describe()))
        print(
            "- 'x official' = our images/s / the official images/s with the same settings (mean of its runs "
            "before and after ours). The reference's time_official_step.py times DINO only: "
            "only the DINO rows are compared with the official code"
        )
    print()
    columns = ["backend", "method", "crops", "K", "images/s", "step s", "first step s", "x base (step time)"]
    columns += ["GFLOP", "x base (FLOP)"] if flops else []
    cells = []
    for r in results:
        base = step.get((r["backend"], r["base"]))
        ratio = f"{r['step_s'] / base:.2f} vs {r['base']}" if base else ""
        own, base_flops = flops.get(r["row"]), flops.get(r["base"])
        flop_cells = [f"{own / 1e9:.4g}" if own else "n/a", f"{own / base_flops:.2f}" if own and base_flops else ""]
        cells.append(
            [
                r["backend"],
                r["row"],
                r["crops"],
                str(r["out_dim"]),
                f"{r['images_per_s']:.3f}",
                f"{r['step_s']:.3f}",
                f"{r['compile_s']:.1f}",
                ratio,
            ]
            + (flop_cells if flops else [])
        )
        if bracket:
            official = bracket.images_per_s(official_of[r["row"]]) if r["row"] in official_of else None
            cells[-1].append(
                f"{r['images_per_s'] / official:.2f}"
                if official
                else "n/a (failed)"
                if r["row"] in official_of
                else "— (no official step)"
            )
    print_table(columns + (["x official"] if bracket else []), cells)


if __name__ == "__main__":
    main()
