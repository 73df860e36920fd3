"""Runs the official DINO step (a reference checkout's ``time_official_step.py``) beside ours.

The official code is a measuring stick: it is never copied here, only run in a subprocess from
the folder the user names with ``--reference``. It is timed before and after our rows, in the
same invocation, so that every "x official" ratio compares two measurements on the same machine
under the same load, and the drift between the two official runs shows how steady the machine was.
"""

import json
import os
import platform
import socket
import subprocess
import sys

SCRIPT = "time_official_step.py"
# Official ``vision_transformer`` presets (embed_dim, depth, num_heads); the official script takes
# only these, so our model is built with the same numbers when compared with it.
ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def check_reference(path):
    """The absolute path of ``path/time_official_step.py``; exits with a message when absent."""
    script = os.path.join(os.path.abspath(path), SCRIPT)
    if not os.path.isfile(script):
        sys.exit(f"--reference {path}: no {SCRIPT} there")
    return script


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def official_args(settings, steps):
    """The official script's command-line arguments for ``settings`` (keys: arch, patch, batch,
    global_size, local_size, locals, out_dim)."""
    return [
        "--arch",
        settings["arch"],
        "--patch",
        str(settings["patch"]),
        "--batch",
        str(settings["batch"]),
        "--global-size",
        str(settings["global_size"]),
        "--local-size",
        str(settings["local_size"]),
        "--locals",
        str(settings["locals"]),
        "--out-dim",
        str(settings["out_dim"]),
        "--steps",
        str(steps),
    ]


def run_official(script, settings, steps, when):
    """images/s of one official run (a dict with its JSON line), or None after printing why."""
    cmd = [sys.executable, script, *official_args(settings, steps)]
    print(f"official ({when}): python {script} {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    # Its one-process gloo group needs a port; a free one keeps two runs on one machine apart.
    env = dict(os.environ, DINO_REF=os.path.dirname(script), MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        missing = [line for line in out.stderr.splitlines() if "No module named" in line]
        print(
            f"official step ({when}) failed{': ' + missing[-1] if missing else ''}:\n{out.stderr[-3000:]}",
            file=sys.stderr,
        )
        return None
    result = json.loads(lines[-1])
    print(f"  official ({when}): {result['images_per_s']:.3f} images/s", file=sys.stderr, flush=True)
    return result


class Bracket:
    """Official runs before and after ours, for each distinct official setting."""

    def __init__(self, script, steps):
        self.script, self.steps = script, steps
        self.runs = {}  # settings key -> {"settings", "before", "after"}

    @staticmethod
    def key(settings):
        return tuple(sorted(settings.items()))

    def before(self, settings_list):
        for s in settings_list:
            if self.key(s) not in self.runs:
                self.runs[self.key(s)] = {"settings": s, "before": run_official(self.script, s, self.steps, "before")}

    def after(self):
        for run in self.runs.values():
            run["after"] = run_official(self.script, run["settings"], self.steps, "after")

    def images_per_s(self, settings):
        """Mean official images/s of the before and after runs (None when either failed)."""
        run = self.runs.get(self.key(settings))
        if not run or not run["before"] or not run.get("after"):
            return None
        return (run["before"]["images_per_s"] + run["after"]["images_per_s"]) / 2

    def describe(self):
        """Markdown lines: each official setting, the exact arguments passed and both measurements."""
        lines = []
        for run in self.runs.values():
            b, a = run["before"], run.get("after")
            fmt = lambda r: f"{r['images_per_s']:.3f}" if r else "failed"  # noqa: E731
            mean = self.images_per_s(run["settings"])
            drift = f", drift {100 * (a['images_per_s'] / b['images_per_s'] - 1):+.0f}%" if mean else ""
            threads = f", {b['threads']} torch threads" if b else ""
            lines.append(
                f"- official DINO (`{SCRIPT} {' '.join(official_args(run['settings'], self.steps))}`): "
                f"before {fmt(b)}, after {fmt(a)} images/s" + (f", mean {mean:.3f}{drift}" if mean else "") + threads
            )
        return lines


def machine():
    """'<cpu model>, N cores' (N = the cores this process may use)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores"
