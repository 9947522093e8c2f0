#!/usr/bin/env python3
"""Runs an example and checks what it reports against facts computed here, independently.

    check_examples.py depth_pattern  EXE [ARGS...]  Adam wins depth 1, Muon depths 5 and 10
    check_examples.py depth_complete EXE [ARGS...]  the CSV holds every run of the grid
    check_examples.py rms            EXE            update RMS against 1/sqrt(max(m, n)) scales
    check_examples.py entropy        EXE [ARGS...]  one entropy in (0, 1] per layer and optimizer
    check_examples.py loss_falls     EXE FACTOR     the last printed loss < first / FACTOR
    check_examples.py gpt            EXE [ARGS...]  every run's validation loss falls, the
                                                    target is AdamW's best, resume is exact
                                                    (and with --qk-clip, logits held near it)
    check_examples.py gpt_parallel   MPIEXEC NP_FLAG EXE [ARGS...]
                                                    2 processes equal 2 micro-batches bit for bit
"""
import csv
import math
import os
import re
import subprocess
import sys
import tempfile

ACTIVATIONS = ("linear", "silu")
DEPTHS = (1, 2, 5, 10)
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def run(args, cwd=None):
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        sys.exit(f"{args[0]} exited with {result.returncode}")
    return result.stdout


def depth_rows(exe, args):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "runs.csv")
        run([exe, *args, "--csv", path])
        with open(path, newline="") as f:
            return list(csv.DictReader(f))


def depth_complete(exe, args):
    rows = depth_rows(exe, args)
    seen = {(r["activation"], int(r["depth"]), r["optimizer"], float(r["lr"])) for r in rows}
    expected = {(a, d, o, lr) for a in ACTIVATIONS for d in DEPTHS for o in ("adam", "muon")
                for lr in LRS}
    if len(rows) != len(expected) or seen != expected:
        sys.exit(f"the CSV has {len(rows)} rows; missing {sorted(expected - seen)[:5]}")
    for r in rows:
        loss = float(r["final_loss"])
        if not (loss >= 0):  # inf (diverged) is a valid result, NaN is not
            sys.exit(f"bad loss in {r}")


def depth_pattern(exe, args):
    best = {}
    for r in depth_rows(exe, args):
        key = (r["activation"], int(r["depth"]), r["optimizer"])
        best[key] = min(best.get(key, math.inf), float(r["final_loss"]))
    failures = []
    for a in ACTIVATIONS:
        for depth, winner in ((1, "adam"), (5, "muon"), (10, "muon")):
            loser = "muon" if winner == "adam" else "adam"
            if not best[(a, depth, winner)] < best[(a, depth, loser)]:
                failures.append(f"{a} depth {depth}: {winner} {best[(a, depth, winner)]:.3e} "
                                f"is not below {loser} {best[(a, depth, loser)]:.3e}")
    if failures:
        sys.exit("the seed's pattern is not reproduced:\n" + "\n".join(failures))
    print("pattern reproduced: Adam ahead at depth 1, Muon ahead at depths 5 and 10")


def rms(exe):
    out = run([exe])
    rows = re.findall(r"^ *(\d+)x(\d+) +\S+ +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) *$", out, re.M)
    if len(rows) < 4:
        sys.exit(f"expected a row per shape, found {len(rows)}")
    for m, n, orig_ns, orig_exact, match_ns, match_exact in rows:
        m, n = int(m), int(n)
        msign_rms = 1 / math.sqrt(max(m, n))  # RMS of U V^T for a full-rank m x n matrix
        want_orig = math.sqrt(max(1, m / n)) * msign_rms
        checks = [(float(orig_exact), want_orig, 1e-3), (float(match_exact), 0.2, 1e-3),
                  # NS5 (keller) leaves singular values within about 0.7..1.2 of 1
                  (float(orig_ns), want_orig, 0.15), (float(match_ns), 0.2, 0.15)]
        for got, want, rel in checks:
            if abs(got - want) > rel * want + 5e-5:  # + half the printed last digit
                sys.exit(f"{m}x{n}: RMS {got} is not within {rel:.0%} of {want:.4f}")


def entropy(exe, args):
    out = run([exe, *args])
    layers = re.findall(r"^w\d+ +([\d.]+) +([\d.]+) +([\d.]+) *$", out, re.M)
    if len(layers) != 5:
        sys.exit(f"expected 5 weight matrices, found {len(layers)}")
    for values in layers:
        for h in map(float, values):
            if not 0 < h <= 1:
                sys.exit(f"entropy {h} outside (0, 1]")


def loss_falls(exe, factor):
    out = run([exe])
    # Rows of the loss tables: a step number, then one or more losses.
    losses = [float(m.group(1))
              for m in re.finditer(r"^ *\d+ +([-\d.e+]+)(?: +[-\d.e+]+)* *$", out, re.M)]
    if len(losses) < 2 or not losses[-1] < losses[0] / factor:
        sys.exit(f"losses {losses}: the last is not below the first / {factor}")


FORTUNES = "/usr/share/games/fortunes"  # Debian's fortunes package, the example's text
SKIP = 77  # CTest's skip code


def gpt(exe, args):
    if not os.path.isdir(FORTUNES):
        print(f"{FORTUNES} is missing (Debian: fortunes): skipped")
        sys.exit(SKIP)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curves.csv")
        out = run([exe, *args, "--csv", path, "--check-resume"])
        curves = {}
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                curves.setdefault((r["optimizer"], r["lr"]), []).append(float(r["validation_loss"]))
    if {o for o, _ in curves} != {"AdamW", "Muon"}:
        sys.exit(f"expected AdamW and Muon runs, found {sorted(curves)}")
    for key, losses in curves.items():
        # Untrained, the loss is near ln(256) = 5.5 nats per byte; 40 steps bring it well below.
        if not losses[-1] < 0.8 * losses[0]:
            sys.exit(f"{key}: validation loss {losses[0]:.3f} -> {losses[-1]:.3f} did not fall by 20%")
    target = min(losses[-1] for (o, _), losses in curves.items() if o == "AdamW")
    printed = re.search(r"AdamW's best final validation loss: ([\d.]+)", out)
    if not printed or abs(float(printed.group(1)) - target) > 5e-5:
        sys.exit(f"the printed target is not AdamW's best final loss {target:.4f}")
    if "the same weights, bit for bit" not in out:
        sys.exit("the resumed Muon run did not end on the same weights")
    if "--qk-clip" in args:  # each Muon step's clip holds the logits near tau
        tau = float(args[args.index("--qk-clip") + 1])
        rows = re.findall(r"^Muon +\S+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+ +([\d.]+)$", out, re.M)
        if not rows or any(float(m) > 2 * tau for m in rows):
            sys.exit(f"Muon's largest attention logits {rows} pass 2 x the QK-clip threshold {tau}")


def gpt_parallel(mpiexec, np_flag, exe, args):
    """`mpiexec -n 2` against one process with 2 micro-batches: each process (each micro-batch)
    backpropagates the mean loss of the same half of every batch, and the halves' gradients are
    summed (a + b, whichever order) and halved (exact), so both runs take the same steps: their
    validation curves (printed to 17 digits) must be identical, and the processes' replicas and
    the sharded checkpoint's resume exact."""
    if not os.path.isdir(FORTUNES):
        print(f"{FORTUNES} is missing (Debian: fortunes): skipped")
        sys.exit(SKIP)
    curves = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, launch in enumerate(([exe, "--micro-batches", "2"], [mpiexec, np_flag, "2", exe])):
            path = os.path.join(tmp, f"curves{i}.csv")
            out = run([*launch, *args, "--csv", path, "--check-resume"])
            if "the same weights, bit for bit" not in out:
                sys.exit(f"{launch}: the resumed Muon run did not end on the same weights")
            with open(path, newline="") as f:
                curves.append([(r["optimizer"], r["lr"], r["step"], r["validation_loss"])
                               for r in csv.DictReader(f)])
    if "replicas: every run ended on the same weights on 2 processes" not in out:
        sys.exit("the 2 processes did not end on the same weights")
    if not curves[0] or curves[0] != curves[1]:
        diff = [(a, b) for a, b in zip(*curves) if a != b][:3]
        sys.exit(f"the 2-process curves differ from the 2-micro-batch ones, first: {diff}")
    print(f"{len(curves[0])} validation losses identical in both runs")


def main():
    check, exe, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if check == "depth_pattern":
        depth_pattern(exe, args)
    elif check == "depth_complete":
        depth_complete(exe, args)
    elif check == "rms":
        rms(exe)
    elif check == "entropy":
        entropy(exe, args)
    elif check == "gpt":
        gpt(exe, args)
    elif check == "gpt_parallel":
        gpt_parallel(exe, args[0], args[1], args[2:])
    elif check == "loss_falls":
        loss_falls(exe, float(args[0]))
    else:
        sys.exit(f"unknown check {check}")


if __name__ == "__main__":
    main()
