#!/usr/bin/env python3
"""Golden trajectories from the public implementations themselves, for the rules a NumPy
reference does not cover (tests/reference/muon_reference.py covers Muon and AdamW).

Peers (fetched, never vendored; nothing here runs in CI):
  Lion: microsoft/dion, dion/scalar_opts.py, lion_update (checked at commit
        0a059a4542e5aa74b40dcd1dce363836c7afcd48).

Set-up, once (PyPI's torch; Debian's python3-torch is too old):
    python3 -m venv /tmp/peers/venv && /tmp/peers/venv/bin/pip install 'torch>=2.9' numpy
    git clone https://github.com/microsoft/dion /tmp/peers/dion

    /tmp/peers/venv/bin/python tests/reference/peer_reference.py generate tests/golden --dion /tmp/peers/dion
        regenerates the committed lion_*.npy files and tests/golden/peer_cases.txt;
    /tmp/peers/venv/bin/python tests/reference/peer_reference.py check-cli path/to/muon-cli --dion /tmp/peers/dion [--seed N]
        draws fresh random trajectories (a new seed each run unless given), runs
        `muon-cli step --rule lion` on them and compares with the peer; exit status 1 on a
        mismatch.

The peer runs eagerly (TORCHDYNAMO_DISABLE=1: its torch.compile decorator is then a no-op, the
eager operations being the semantics compilation must keep), on the CPU, in float64, with its
scalar arguments as float64 tensors.
"""
import importlib.util
import os
import subprocess
import sys
import tempfile

os.environ["TORCHDYNAMO_DISABLE"] = "1"
import numpy as np  # noqa: E402
import torch  # noqa: E402

LION_CASES = [  # name, shape, options (beta1 = 0.3 takes torch.lerp's other branch)
    ("dion_defaults", (7,), dict(lr=0.01, beta1=0.9, beta2=0.99, wd=0.1)),
    ("matrix_no_decay", (3, 5), dict(lr=0.003, beta1=0.95, beta2=0.98, wd=0.0)),
    ("low_beta1", (4, 4), dict(lr=0.02, beta1=0.3, beta2=0.9, wd=0.05)),
]


def load_dion(path):
    spec = importlib.util.spec_from_file_location(
        "dion_scalar_opts", os.path.join(path, "dion", "scalar_opts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lion_trajectory(dion, w0, grads, lr, beta1, beta2, wd):
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    x = torch.from_numpy(np.array(w0, dtype=np.float64))
    m = torch.zeros_like(x)
    out = []
    for g in grads:
        dion.lion_update(x, torch.from_numpy(np.array(g, dtype=np.float64)), m, t(lr), t(beta1),
                         t(beta2), t(wd))
        out.append(x.numpy().copy())
    return out


def generate(outdir, dion):
    rng = np.random.default_rng(20261204)
    lines = ["# written by tests/reference/peer_reference.py generate; do not edit",
             "# kind name shape key=value... ; files: <kind>_<name>.npy (w0, g_1..g_T, w_1..w_T)"]
    for name, shape, kw in LION_CASES:
        w0 = rng.standard_normal(shape)
        grads = [rng.standard_normal(shape) for _ in range(5)]
        traj = lion_trajectory(dion, w0, grads, **kw)
        np.save(os.path.join(outdir, f"lion_{name}.npy"), np.stack([w0] + grads + traj))
        lines.append(f"lion {name} {','.join(map(str, shape))} " +
                     " ".join(f"{k}={v}" for k, v in kw.items()))
    with open(os.path.join(outdir, "peer_cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def check_cli(cli, dion, seed):
    rng = np.random.default_rng(seed)
    worst, checks = 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(8):
            shape = [(6,), (5, 7), (4, 3, 2)][trial % 3]
            kw = dict(lr=float(rng.uniform(1e-4, 3e-2)), beta1=float(rng.uniform(0, 0.99)),
                      beta2=float(rng.uniform(0.5, 0.999)), wd=float(rng.uniform(0, 0.2)))
            w0 = rng.standard_normal(shape)
            grads = [rng.standard_normal(shape) for _ in range(int(rng.integers(1, 6)))]
            for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
                # float32 rounding of the inputs is common to both sides
                w_in = w0.astype(dtype).astype(np.float64)
                g_in = [g.astype(dtype).astype(np.float64) for g in grads]
                want = lion_trajectory(dion, w_in, g_in, **kw)[-1]
                np.save(os.path.join(tmp, "p.npy"), w0.astype(dtype))
                args = [cli, "step", "--rule", "lion", "--param", os.path.join(tmp, "p.npy"),
                        "--out", os.path.join(tmp, "out.npy"), "--lr", repr(kw["lr"]),
                        "--beta1", repr(kw["beta1"]), "--beta2", repr(kw["beta2"]),
                        "--weight-decay", repr(kw["wd"]), "--dtype", dtype]
                for i, g in enumerate(grads):
                    path = os.path.join(tmp, f"g{i}.npy")
                    np.save(path, g.astype(dtype))
                    args += ["--grad", path]
                subprocess.run(args, check=True)
                got = np.load(os.path.join(tmp, "out.npy")).astype(np.float64)
                err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
                worst = max(worst, err / tol)
                checks += 1
                if err > tol:
                    print(f"MISMATCH lion {dtype} {shape} {kw}: error {err:.3g} > {tol:g}")
                    return 1
    print(f"seed {seed}: {checks} lion trajectories match dion's lion_update "
          f"(worst error {worst:.3g} of its tolerance)")
    return 0


def main():
    args = sys.argv[1:]
    if "--dion" not in args or len(args) < 4:
        print(__doc__)
        return 2
    dion = load_dion(args[args.index("--dion") + 1])
    if args[0] == "generate":
        generate(args[1], dion)
        return 0
    if args[0] == "check-cli":
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else \
            int.from_bytes(os.urandom(4), "little")
        return check_cli(args[1], dion, seed)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
