#!/usr/bin/env python3
"""Does AOL rescaling (as in Turbo-Muon, arXiv 2512.04632) buy one Newton-Schulz step?

AOL replaces the Frobenius normalization X / ||X||_F by D X with D = diag(sum_j |A_ij|)^(-1/2),
A = X X^T (short side), which bounds ||D X||_2 <= 1 and leaves the small singular values larger
than the Frobenius scaling does. The question this answers by measurement: with AOL, does the
schedule reach in T - 1 steps at least the accuracy (distance to the exact msign of X, by SVD
in double) that the plain iteration reaches in T? The library keeps AOL only if it does.

  /usr/bin/python3 bench/aol_preconditioning.py     (Debian's NumPy; about a minute)
"""
import numpy as np

KELLER = (3.4445, -4.7750, 2.0315)
# Polar Express, the published 5-step list (Amsel et al. 2025), safety factor already applied
POLAR = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
         (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
         (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
         (3.3184196573706015, -2.488488024314874, 0.51004894012372),
         (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]


def msign(x):
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    return u @ vt


def iterate(x, steps):
    for a, b, c in steps:
        g = x @ x.T
        x = (a * np.eye(len(g)) + b * g + c * g @ g) @ x
    return x


def frobenius(x):
    return x / np.linalg.norm(x)


def aol(x):
    d = 1 / np.sqrt(np.abs(x @ x.T).sum(axis=1))
    return d[:, None] * x


def distance(o, exact):
    return np.linalg.norm(o - exact) / np.sqrt(min(o.shape))


def main():
    rng = np.random.default_rng(1234)
    print("distance to msign(X), ||O - msign(X)||_F / sqrt(k), float64, Gaussian and low-rank-plus-noise X")
    print(f"{'shape':>10} {'input':>10} {'schedule':>14} {'T':>2} {'frobenius, T':>13} "
          f"{'AOL, T-1':>10} {'AOL, T':>10} {'AOL buys a step':>16}")
    for m, n in [(256, 1024), (1024, 1024), (1024, 256)]:
        for kind in ["gaussian", "low rank"]:
            x = rng.standard_normal((m, n))
            if kind == "low rank":  # a decaying spectrum, as gradients have
                x = (rng.standard_normal((m, 16)) @ rng.standard_normal((16, n))) + 0.05 * x
            short = x if m <= n else x.T
            exact = msign(short)
            for name, sched in [("keller", [KELLER] * 5), ("polar_express", POLAR)]:
                t = len(sched)
                plain = distance(iterate(frobenius(short), sched), exact)
                fewer = distance(iterate(aol(short), sched[:t - 1]), exact)
                same = distance(iterate(aol(short), sched), exact)
                print(f"{f'{m}x{n}':>10} {kind:>10} {name:>14} {t:>2} {plain:13.4e} {fewer:10.4e} "
                      f"{same:10.4e} {'yes' if fewer <= plain else 'no':>16}")


if __name__ == "__main__":
    main()
