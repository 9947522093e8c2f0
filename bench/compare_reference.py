#!/usr/bin/env python3
"""Times muon's Newton-Schulz (keller, 5 steps, float32 matrices; float32 products and muon's
automatic choice, bfloat16 products on CPUs that multiply bf16 in hardware) against the
reference NS5 loop in NumPy and in PyTorch on the CPU (float32, and torch.optim.Muon's own
bfloat16 NS), side by side in one run on this machine, and checks how close each is to the
exact msign.

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch numpy   # once, not in CI
    .venv-torch/bin/python bench/compare_reference.py --cli build/muon-cli [--shape MxN]...

The reference loop is the one of the public implementations (torch.optim.Muon, Keller Jordan's
muon.py), written here with NumPy or torch matrix products:
    X /= max(||X||_F, 1e-7);  for 5 steps: A = X X^T;  B = b A + c A A;  X = a X + B X
(iterated on the short side). The bf16 column is torch.optim.Muon's own function (PyTorch >= 2.9).
NumPy uses its own BLAS (a wheel bundles a newer OpenBLAS than Debian's); PyTorch's CPU
products are MKL/oneDNN. Missing packages leave their columns out (nan). The first line printed
is muon's: the CPU's instruction set and the kernels its products run on.
"""
import argparse
import os
import re
import subprocess
import tempfile
import time

import numpy as np

A, B, C = 3.4445, -4.7750, 2.0315
SHAPES = ["1024x4096", "4096x1024", "2048x2048", "768x3072", "1024x1024"]


def ns5_numpy(g):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(np.linalg.norm(x), 1e-7)
    for _ in range(5):
        a = x @ x.T
        b = B * a + C * (a @ a)
        x = A * x + b @ x
    return x.T if g.shape[0] > g.shape[1] else x


def ns5_torch(torch, g):
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(5):
        a = x @ x.T
        b = torch.addmm(a, a, a, beta=B, alpha=C)
        x = torch.addmm(x, b, x, beta=A)
    return x.T if g.shape[0] > g.shape[1] else x


def median_ms(f, repeat):
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def msign_distance(o, g):
    u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    return np.linalg.norm(o.astype(np.float64) - u @ vt) / np.sqrt(min(g.shape))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--shape", action="append")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(os.cpu_count())
        muon_ns_bf16 = getattr(getattr(torch.optim, "_muon", None), "_zeropower_via_newtonschulz",
                               None)
    except ImportError:
        torch, muon_ns_bf16 = None, None
    shapes = args.shape or SHAPES
    version = subprocess.run([args.cli, "--version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    print(version)
    print(f"NS5 keller float32, median of {args.repeat} after a warm-up, {os.cpu_count()} cores; "
          f"numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ", no torch")
          + ("" if muon_ns_bf16 else " (no torch.optim.Muon: no bf16 column)"))
    print("muon f32 / auto: muon with float32 products / with its automatic choice (products "
          "column); ratios: the other's ms / muon's (above 1: muon faster); auto vs torch bf16, "
          "f32 vs numpy and torch f32")
    print(f"{'shape':<11} {'muon f32':>8} {'auto':>8} {'products':>9} {'numpy':>8} "
          f"{'torch':>8} {'bf16':>8} {'auto/bf16':>9} {'f32/np':>7} {'f32/torch':>9}   "
          f"dist_msign muon f32 / auto / numpy / torch / bf16")
    rng = np.random.default_rng(1234)
    nan = float("nan")

    def muon_run(shape, precision):
        out = subprocess.run([args.cli, "bench", "--shape", shape, "--dtype", "float32",
                              "--precision", precision, "--repeat", str(args.repeat)],
                             check=True, capture_output=True, text=True).stdout
        row = next(line for line in out.splitlines() if line.startswith(shape + " ")).split()
        return float(row[5]), row[2]

    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            m, n = map(int, shape.split("x"))
            f32_ms, _ = muon_run(shape, "float32")
            auto_ms, products = muon_run(shape, "auto")
            g = rng.standard_normal((m, n)).astype(np.float32)
            numpy_ms = median_ms(lambda: ns5_numpy(g), args.repeat)
            src, dst = os.path.join(tmp, "g.npy"), os.path.join(tmp, "o.npy")
            np.save(src, g)
            dist = {}
            for precision in ("float32", "auto"):
                subprocess.run([args.cli, "orthogonalize", src, dst, "--dtype", "float32",
                                "--precision", precision], check=True)
                dist[precision] = msign_distance(np.load(dst), g)
            d_numpy = msign_distance(ns5_numpy(g), g)
            torch_ms = d_torch = bf16_ms = d_bf16 = nan
            if torch:
                tg = torch.from_numpy(g)
                torch_ms = median_ms(lambda: ns5_torch(torch, tg), args.repeat)
                d_torch = msign_distance(ns5_torch(torch, tg).numpy(), g)
            if muon_ns_bf16:
                bf16 = lambda: muon_ns_bf16(tg, (A, B, C), 5, 1e-7)  # noqa: E731
                bf16_ms = median_ms(bf16, args.repeat)
                d_bf16 = msign_distance(bf16().float().numpy(), g)
            print(f"{shape:<11} {f32_ms:8.1f} {auto_ms:8.1f} {products:>9} {numpy_ms:8.1f} "
                  f"{torch_ms:8.1f} {bf16_ms:8.1f} {bf16_ms / auto_ms:8.2f}x "
                  f"{numpy_ms / f32_ms:6.2f}x {torch_ms / f32_ms:8.2f}x   "
                  f"{dist['float32']:.4f} / {dist['auto']:.4f} / {d_numpy:.4f} / {d_torch:.4f} / "
                  f"{d_bf16:.4f}", flush=True)


if __name__ == "__main__":
    main()
