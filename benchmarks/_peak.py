"""This machine's fp32 matmul peak as PyTorch measures it, in its own process.

The peak is the best GFLOP/s over a few large square GEMMs and the ViT-S MLP's GEMM (3152 x 384
x 1536, the student's global tokens of a batch of 8), each the median of several runs after a
warm-up, with torch's default thread count (the one the official DINO step runs with). A
training step cannot beat it in fp32, so "share of peak" bounds what any speed-up can reach.

    python benchmarks/_peak.py      # prints one JSON line
"""

import json

SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (3072, 3072, 3072), (3152, 384, 1536))


def measure(repeats=7):
    """``{"gflops": best, "shape": "MxKxN", "threads": n}`` of the fastest GEMM of ``SHAPES``."""
    import torch
    from _timing import median_seconds

    best = (0.0, None)
    with torch.no_grad():
        for m, k, n in SHAPES:
            a, b = torch.rand(m, k), torch.rand(k, n)
            gflops = 2 * m * k * n / median_seconds(lambda: torch.mm(a, b), repeats) / 1e9
            best = max(best, (gflops, f"{m}x{k}x{n}"), key=lambda x: x[0])
    return {"gflops": best[0], "shape": best[1], "threads": torch.get_num_threads()}


def peak_gflops():
    """The measurement above, run in a fresh process; None (after saying why) when it failed."""
    from _subprocess import run_worker

    return run_worker([__file__], "torch fp32 matmul peak", timeout=300)


if __name__ == "__main__":
    print(json.dumps(measure()))
