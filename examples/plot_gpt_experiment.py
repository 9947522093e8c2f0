#!/usr/bin/env python3
"""Plots gpt_muon_vs_adamw's CSV: validation loss against step, every learning rate of the
sweep (faint) and each optimizer's best (bold), AdamW's best final loss as the target line and
the step at which Muon's best run first reaches it.

    python3 examples/plot_gpt_experiment.py curves.csv curves.png

Needs matplotlib (Debian: python3-matplotlib).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt

COLORS = {"AdamW": "tab:blue", "Muon": "tab:red"}


def read_runs(path):
    """{(optimizer, lr): ([steps], [validation losses])}"""
    runs = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            steps, losses = runs.setdefault((row["optimizer"], float(row["lr"])), ([], []))
            steps.append(int(row["step"]))
            losses.append(float(row["validation_loss"]))
    return runs


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_gpt_experiment.py CURVES.csv OUTPUT.png")
    runs = read_runs(sys.argv[1])
    best = {}
    for (optimizer, lr), (_, losses) in runs.items():
        if optimizer not in best or losses[-1] < runs[(optimizer, best[optimizer])][1][-1]:
            best[optimizer] = lr
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (optimizer, lr), (steps, losses) in sorted(runs.items()):
        is_best = best.get(optimizer) == lr
        ax.plot(steps, losses, color=COLORS.get(optimizer, "gray"), alpha=1.0 if is_best else 0.25,
                linewidth=2 if is_best else 1,
                label=f"{optimizer}, lr {lr:g}" + (" (best)" if is_best else ""))
    if "AdamW" in best:
        target = runs[("AdamW", best["AdamW"])][1][-1]
        ax.axhline(target, color="black", linestyle="--", linewidth=1,
                   label=f"AdamW's best final loss {target:.3f}")
        if "Muon" in best:
            steps, losses = runs[("Muon", best["Muon"])]
            reached = next((s for s, l in zip(steps, losses) if l <= target), None)
            if reached is not None:
                ax.axvline(reached, color=COLORS["Muon"], linestyle=":", linewidth=1)
                ax.annotate(f"Muon reaches it at step {reached}\n"
                            f"({100 * reached / steps[-1]:.0f}% of AdamW's steps)",
                            (reached, target), textcoords="offset points", xytext=(8, 30))
    final = [losses[-1] for _, losses in runs.values()]
    ax.set_ylim(min(final) - 0.1, max(final) + 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("A small GPT on Debian's fortunes: Muon + AdamW against AdamW")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=120)


if __name__ == "__main__":
    main()
