#!/usr/bin/env python3
"""Plots depth_experiment's CSV: best final loss (over learning rates) against depth, Adam vs
Muon, one panel per activation.

    python3 examples/plot_depth_experiment.py depth_experiment.csv depth_experiment.png

Needs matplotlib (Debian: python3-matplotlib).
"""
import csv
import math
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt


def best_losses(path):
    """{(activation, optimizer): {depth: best final loss over the learning rates}}"""
    best = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            cell = best.setdefault((row["activation"], row["optimizer"]), {})
            depth, loss = int(row["depth"]), float(row["final_loss"])
            cell[depth] = min(cell.get(depth, math.inf), loss)
    return best


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_depth_experiment.py RESULTS.csv OUTPUT.png")
    best = best_losses(sys.argv[1])
    activations = sorted({a for a, _ in best})
    fig, axes = plt.subplots(1, len(activations), figsize=(5 * len(activations), 4),
                             squeeze=False)
    for ax, activation in zip(axes[0], activations):
        for optimizer, style in (("adam", "o-"), ("muon", "s-")):
            losses = best.get((activation, optimizer), {})
            depths = sorted(losses)
            ax.plot(depths, [losses[d] for d in depths], style, label=optimizer.capitalize())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 5, 10], labels=["1", "2", "5", "10"])
        ax.set_xlabel("depth")
        ax.set_ylabel("best final test MSE")
        ax.set_title(f"{activation} activation")
        ax.legend()
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
