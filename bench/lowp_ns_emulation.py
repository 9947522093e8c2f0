#!/usr/bin/env python3
"""The numerical design of the CUDA backend's 16-bit Newton-Schulz, emulated in NumPy.

    python3 bench/lowp_ns_emulation.py

Emulates what cuda/include/muon/cuda/backend.cuh does in bf16 / fp16 storage (products
accumulated exactly, then rounded to the storage type, as cuBLAS's fp32 accumulation nearly
does): the standard loop, the Gram form restarted before step 3 (as Dao-AILab's
gram-newton-schulz does), and symmetric products computed as lower blocks and mirrored.
Prints each variant's largest entry error relative to the largest entry of the fp64 standard
loop, on a Gaussian and on a rank-8-plus-noise input. This checks the algorithms (order of
the Gram updates, the restart, the blocking), not the CUDA code; tests/cuda checks that.
"""
import numpy as np

COEFFS = (3.4445, -4.7750, 2.0315)  # keller, 5 steps


def rounded(x, storage):
    if storage == "fp64":
        return x
    if storage == "fp16":
        return x.astype(np.float16).astype(np.float64)
    bits = x.astype(np.float32).view(np.uint32)  # bf16: round to nearest even on fp32 bits
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


def symmetric(p, r, blocks, storage, alpha=1.0, s=None, beta=0.0, gamma=0.0):
    """alpha P R + beta S + gamma I from the lower blocks of P R only, mirrored."""
    k = p.shape[0]
    size = k // blocks
    out = np.zeros((k, k))
    for i in range(blocks):
        for j in range(i + 1):
            out[i * size:(i + 1) * size, j * size:(j + 1) * size] = \
                p[i * size:(i + 1) * size, :] @ r[:, j * size:(j + 1) * size]
    out = alpha * out + (beta * s if s is not None else 0) + gamma * np.eye(k)
    return rounded(np.tril(out) + np.tril(out, -1).T, storage)


def standard(g, storage, blocks=1):
    x = rounded(g / np.linalg.norm(g), storage)
    a, b, c = COEFFS
    for _ in range(5):
        gram = symmetric(x, x.T, blocks, storage)
        poly = symmetric(gram, gram, blocks, storage, c, gram, b, a)
        x = rounded(poly @ x, storage)
    return x


def gram_form(g, storage, blocks=1, restart=2, steps=5):
    x = rounded(g / np.linalg.norm(g), storage)
    a, b, c = COEFFS
    r = symmetric(x, x.T, blocks, storage)
    q = None
    for t in range(steps):
        if t == restart and q is not None:
            x = rounded(q @ x, storage)
            r = symmetric(x, x.T, blocks, storage)
            q = None
        poly = symmetric(r, r, blocks, storage, c, r, b, a)
        if t + 1 < steps and t + 1 != restart:
            w = symmetric(r, poly, blocks, storage)
            r = symmetric(poly, w, blocks, storage)
        q = poly if q is None else symmetric(poly, q, blocks, storage)
    return rounded(q @ x, storage)


def main():
    rng = np.random.default_rng(0)
    m, n = 256, 1024
    inputs = {
        "gaussian": rng.standard_normal((m, n)),
        "rank 8 + noise": rng.standard_normal((m, 8)) @ rng.standard_normal((8, n)) / n
        + 1e-2 * rng.standard_normal((m, n)),
    }
    print(f"{m}x{n}, error vs fp64 standard NS5 (max |diff| / max |ref|)")
    print(f"{'input':<16}{'storage':<8}{'standard':>10}{'std 4x4':>10}{'gram':>10}"
          f"{'gram 4x4':>10}{'no restart':>11}")
    for name, g in inputs.items():
        ref = standard(g, "fp64")
        err = lambda y: np.abs(y - ref).max() / np.abs(ref).max()
        for storage in ("fp64", "bf16", "fp16"):
            print(f"{name:<16}{storage:<8}{err(standard(g, storage)):>10.2e}"
                  f"{err(standard(g, storage, 4)):>10.2e}{err(gram_form(g, storage)):>10.2e}"
                  f"{err(gram_form(g, storage, 4)):>10.2e}"
                  f"{err(gram_form(g, storage, 1, restart=99)):>11.2e}")


if __name__ == "__main__":
    main()
