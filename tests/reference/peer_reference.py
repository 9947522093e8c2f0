#!/usr/bin/env python3
"""Golden trajectories from the public implementations themselves, for the rules a NumPy
reference does not cover (tests/reference/muon_reference.py covers Muon and AdamW).

Peers (fetched, never vendored; nothing here runs in CI):
  Lion: microsoft/dion, dion/scalar_opts.py, lion_update (checked at commit
        0a059a4542e5aa74b40dcd1dce363836c7afcd48).
  NorMuon: microsoft/dion, dion/normuon.py, the NorMuon optimizer itself (same commit), single
        process, with two substitutions that keep the comparison about the rule rather than
        about bf16 rounding: its newton_schulz_func argument is a float64 quintic (Keller
        Jordan's coefficients, 5 steps, X / max(||X||_F, 1e-7): the Newton-Schulz muon
        runs), and dion.normuon's muon_update_pre_orthogonalize is replaced by the same
        formula without its cast of U to bf16 before communication; its learning rate, a
        float32 tensor there, is a float64 one.

Set-up, once (PyPI's torch; Debian's python3-torch is too old):
    python3 -m venv /tmp/peers/venv && /tmp/peers/venv/bin/pip install 'torch>=2.9' numpy
    git clone https://github.com/microsoft/dion /tmp/peers/dion

    /tmp/peers/venv/bin/python tests/reference/peer_reference.py generate tests/golden --dion /tmp/peers/dion
        regenerates the committed lion_*.npy and normuon_*.npy files and tests/golden/peer_cases.txt;
    /tmp/peers/venv/bin/python tests/reference/peer_reference.py check-cli path/to/muon-cli --dion /tmp/peers/dion [--seed N]
        draws fresh random trajectories (a new seed each run unless given), runs
        `muon-cli step --rule lion` and `--rule normuon` on them and compares with the peer;
        exit status 1 on a mismatch.

The peer runs eagerly (TORCHDYNAMO_DISABLE=1: its torch.compile decorator is then a no-op, the
eager operations being the semantics compilation must keep), on the CPU, in float64, with its
scalar arguments as float64 tensors (torch's default dtype float64 where the peer makes them).
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


NORMUON_CASES = [  # name, shape, options; split: row blocks; experts: a 3-D stack
    ("dion_defaults", (6, 4), dict(lr=0.0078125, mu=0.95, beta2=0.95, wd=0.01, nesterov=0,
                                   adjust="spectral")),
    ("wide_nesterov_rms", (3, 7), dict(lr=0.015625, mu=0.9, beta2=0.8, wd=0.1, nesterov=1,
                                       adjust="rms")),
    ("split_rows", (6, 5), dict(lr=0.0078125, mu=0.95, beta2=0.9, wd=0.05, nesterov=0,
                                adjust="spectral", split="2+4")),
    ("experts", (2, 3, 4), dict(lr=0.00390625, mu=0.9, beta2=0.95, wd=0.0, nesterov=1,
                                adjust="none")),
]
ADJUST = {"spectral": "spectral_norm", "rms": "rms_norm", "none": None}


def newton_schulz_f64(x, epsilon=None):
    """The quintic muon runs by default, in float64, on a stack of matrices."""
    a, b, c = 3.4445, -4.7750, 2.0315
    y = x.to(torch.float64)
    tall = y.size(-2) > y.size(-1)
    if tall:
        y = y.mT
    y = y / y.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(5):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if tall else y


def momentum_without_bf16(G, M, momentum, nesterov):
    """dion.muon.muon_update_pre_orthogonalize's formula, U kept in M's dtype."""
    G = [g.to(dtype=M[0].dtype) for g in G]
    torch._foreach_mul_(M, momentum)
    torch._foreach_add_(M, G)
    if nesterov:
        U = torch._foreach_mul(M, momentum)
        torch._foreach_add_(U, G)
    else:
        U = [m.clone() for m in M]
    return U


def hyperparameter_f64(self, index, name):
    """dion keeps a group's lr as a float32 device tensor (for CUDA graphs); float64 here."""
    group = self.param_groups[index]
    if not group["params"]:
        return None
    if not isinstance(group[name], torch.Tensor) or group[name].dtype != torch.float64:
        group[name] = torch.tensor(float(group[name]), dtype=torch.float64)
    return group[name]


def load_dion_normuon(path):
    sys.path.insert(0, path)
    import dion.normuon as normuon
    normuon.muon_update_pre_orthogonalize = momentum_without_bf16
    normuon.NorMuon._ensure_hyperparam_tensor = hyperparameter_f64
    return normuon


def normuon_trajectory(normuon, w0, grads, lr, mu, beta2, wd, nesterov, adjust, split=None):
    # dion makes its scalars with torch.tensor(x): float64 ones under this default, as the
    # golden files are (float32 ones would round mu and beta2 to float32 first)
    torch.set_default_dtype(torch.float64)
    x = torch.nn.Parameter(torch.from_numpy(np.array(w0, dtype=np.float64)))
    group = dict(params=[x])
    if split:
        group["split_sizes"] = tuple(int(n) for n in split.split("+"))
    opt = normuon.NorMuon([group], lr=lr, mu=mu, muon_beta2=beta2, weight_decay=wd,
                          nesterov=bool(nesterov), adjust_lr=ADJUST[adjust],
                          newton_schulz_func=newton_schulz_f64)
    out = []
    for g in grads:
        x.grad = torch.from_numpy(np.array(g, dtype=np.float64))
        opt.step()
        out.append(x.detach().numpy().copy())
    return out


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


def generate(outdir, dion, dion_path):
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
    normuon = load_dion_normuon(dion_path)
    for name, shape, kw in NORMUON_CASES:
        w0 = rng.standard_normal(shape)
        grads = [rng.standard_normal(shape) for _ in range(5)]
        traj = normuon_trajectory(normuon, w0, grads, **kw)
        np.save(os.path.join(outdir, f"normuon_{name}.npy"), np.stack([w0] + grads + traj))
        lines.append(f"normuon {name} {','.join(map(str, shape))} " +
                     " ".join(f"{k}={v}" for k, v in kw.items()))
    with open(os.path.join(outdir, "peer_cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def lion_trial(dion, rng, trial):
    """A random Lion case: its shape, its peer and its muon-cli flags."""
    shape = [(6,), (5, 7), (4, 3, 2)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-4, 3e-2)), beta1=float(rng.uniform(0, 0.99)),
              beta2=float(rng.uniform(0.5, 0.999)), wd=float(rng.uniform(0, 0.2)))
    flags = ["--lr", repr(kw["lr"]), "--beta1", repr(kw["beta1"]), "--beta2", repr(kw["beta2"]),
             "--weight-decay", repr(kw["wd"])]
    return shape, kw, flags, lambda w, g: lion_trajectory(dion, w, g, **kw)


def normuon_trial(normuon, rng, trial):
    """A random NorMuon case: its shape, its peer and its muon-cli flags."""
    shape = [(6, 4), (3, 7), (5, 5)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-3, 3e-2)), mu=float(rng.uniform(0.5, 0.99)),
              beta2=float(rng.uniform(0.5, 0.999)), wd=float(rng.uniform(0, 0.2)),
              nesterov=int(rng.integers(0, 2)),
              adjust=["spectral", "rms", "none"][int(rng.integers(0, 3))])
    scales = {"spectral": "spectral", "rms": "match_rms_adamw", "none": "none"}
    flags = ["--lr", repr(kw["lr"]), "--momentum", repr(kw["mu"]), "--beta2", repr(kw["beta2"]),
             "--weight-decay", repr(kw["wd"]), "--nesterov", "on" if kw["nesterov"] else "off",
             "--scale", scales[kw["adjust"]]]
    return shape, kw, flags, lambda w, g: normuon_trajectory(normuon, w, g, **kw)


def check_cli(cli, rules, seed):
    """Runs `muon-cli step --rule NAME` on random trajectories of each rule (name, trials,
    make_trial, peer, float64 tolerance) in float64 and float32 and compares its last weights
    with the peer's."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        for rule, trials, make_trial, peer, tol64 in rules:
            worst, checks = 0.0, 0
            for trial in range(trials):
                shape, kw, flags, trajectory = make_trial(rng, trial)
                w0 = rng.standard_normal(shape)
                grads = [rng.standard_normal(shape) for _ in range(int(rng.integers(1, 6)))]
                for dtype, tol in (("float64", tol64), ("float32", 1e-5)):
                    # float32 rounding of the inputs is common to both sides
                    want = trajectory(w0.astype(dtype).astype(np.float64),
                                      [g.astype(dtype).astype(np.float64) for g in grads])[-1]
                    np.save(os.path.join(tmp, "p.npy"), w0.astype(dtype))
                    args = [cli, "step", "--rule", rule, "--param", os.path.join(tmp, "p.npy"),
                            "--out", os.path.join(tmp, "out.npy"), "--dtype", dtype] + flags
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
                        print(f"MISMATCH {rule} {dtype} {shape} {kw}: error {err:.3g} > {tol:g}")
                        return 1
            print(f"seed {seed}: {checks} {rule} trajectories match {peer} "
                  f"(worst error {worst:.3g} of its tolerance)")
    return 0


def main():
    args = sys.argv[1:]
    if "--dion" not in args or len(args) < 4:
        print(__doc__)
        return 2
    dion = load_dion(args[args.index("--dion") + 1])
    if args[0] == "generate":
        generate(args[1], dion, args[args.index("--dion") + 1])
        return 0
    if args[0] == "check-cli":
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else \
            int.from_bytes(os.urandom(4), "little")
        normuon = load_dion_normuon(args[args.index("--dion") + 1])
        return check_cli(args[1], [
            ("lion", 8, lambda rng, t: lion_trial(dion, rng, t), "dion's lion_update", 1e-12),
            # Newton-Schulz in another order of products than the peer's: 1e-10
            ("normuon", 6, lambda rng, t: normuon_trial(normuon, rng, t), "dion's NorMuon", 1e-10),
        ], seed)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
