"""Runs one benchmark worker in its own process and reads the JSON line it prints.

Each setting runs in a fresh process so that thread pools, compiled functions and the Keras
backend of one setting never leak into the next.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(args, what, timeout=None, **env):
    """``python *args`` with ``env`` added; returns the last JSON line it printed as a dict,
    or None (after printing the worker's stderr) when it failed or ran past ``timeout``
    seconds."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, **env)
    try:
        out = subprocess.run([sys.executable, *args], env=environ, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{what} was stopped after {timeout:.0f} s", file=sys.stderr)
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        print(f"{what} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])
