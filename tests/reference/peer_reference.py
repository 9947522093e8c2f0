#!/usr/bin/env python3
"""Golden trajectories from the public implementations themselves, for the rules a NumPy
reference does not cover (tests/reference/muon_reference.py covers Muon and AdamW).

Peers (fetched, never vendored; nothing here runs in CI):
  Lion, and AdamW with cautious weight decay: microsoft/dion, dion/scalar_opts.py,
        lion_update and adamw_update (checked at commit
        0a059a4542e5aa74b40dcd1dce363836c7afcd48).
  Newton-Schulz coefficient sets: NVIDIA-NeMo/Emerging-Optimizers, emerging_optimizers/
        orthogonalized_optimizers/muon_utils.py (checked at commit
        fd7729267109a8848709e9406bf19e53e970c3f4): its _COEFFICIENT_SETS, its step
        newton_schulz_step and its coefficient iterator, in float64 (its newton_schulz() takes
        float32 only; the script checks that it agrees with the float64 run to float32 rounding).
        PolarGrad, AdaMuon, NAMO and its NorMuon: the same repository, orthogonalized_
        optimizers/polargrad.py and adaptive_muon.py (moment2_method "adamuon", "namo" and
        "normuon"), the optimizers themselves, in float64 with its newton_schulz() replaced
        by the float64 iteration above.
        It needs Python >= 3.12.
  NorMuon and Muon (cautious weight decay): microsoft/dion, dion/normuon.py and dion/muon.py,
        the NorMuon and Muon optimizers themselves (same commit), single
        process, with two substitutions that keep the comparison about the rule rather than
        about bf16 rounding: its newton_schulz_func argument is a float64 quintic (Keller
        Jordan's coefficients, 5 steps, X / max(||X||_F, 1e-7): the Newton-Schulz muon
        runs), and dion.normuon's muon_update_pre_orthogonalize is replaced by the same
        formula without its cast of U to bf16 before communication; its learning rate, a
        float32 tensor there, is a float64 one.

Set-up, once (PyPI's torch; Debian's python3-torch is too old):
    python3.12 -m venv /tmp/peers/venv && /tmp/peers/venv/bin/pip install 'torch>=2.9' numpy absl-py
    git clone https://github.com/microsoft/dion /tmp/peers/dion
    git clone https://github.com/NVIDIA-NeMo/Emerging-Optimizers /tmp/peers/eo

    /tmp/peers/venv/bin/python tests/reference/peer_reference.py generate tests/golden --dion /tmp/peers/dion --eo /tmp/peers/eo
        regenerates the committed lion_*.npy, normuon_*.npy and nsset_*.npy files and
        tests/golden/peer_cases.txt;
    /tmp/peers/venv/bin/python tests/reference/peer_reference.py check-cli path/to/muon-cli --dion /tmp/peers/dion [--eo /tmp/peers/eo] [--seed N]
        draws fresh random trajectories (a new seed each run unless given), runs
        `muon-cli step --rule NAME` for lion, adamw, muon and normuon (and polargrad,
        adamuon, namo and normuon --convention emerging_optimizers with --eo) on them and
        compares with the peer;
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


# name, the muon schedule that is it, shape, steps (the set's own length, or more where the
# set cycles or repeats its last triple)
NSSET_CASES = [
    ("simple", "simple", (6, 10), 5),
    ("quintic", "quintic", (10, 6), 5),
    ("quintic", "quintic", (6, 10), 8),
    ("polar_express", "polar_express_paper", (6, 10), 8),
    ("polar_express", "polar_express_paper", (9, 9), 10),
    ("cans", "cans", (10, 6), 5),
    ("cans", "cans", (6, 10), 7),
    ("aol", "aol", (6, 10), 4),
    ("aol", "aol", (10, 6), 6),
    ("deepseekv4", "deepseekv4", (6, 10), 10),
    ("cubic5", "cubic5", (10, 6), 5),
    ("cubic5", "cubic5", (8, 8), 5),
]


def optimizer_trajectory(make, w0, grads):
    """The weights after each step of the torch optimizer make([x]) on x = w0 (float64)."""
    x = torch.nn.Parameter(torch.from_numpy(np.array(w0, dtype=np.float64)))
    opt = make([x])
    out = []
    for g in grads:
        x.grad = torch.from_numpy(np.array(g, dtype=np.float64))
        opt.step()
        out.append(x.detach().numpy().copy())
    return out


def load_eo(path):
    sys.path.insert(0, path)
    from emerging_optimizers.orthogonalized_optimizers import muon_utils
    return muon_utils


def eo_repeat_mode(muon_utils, name):
    """The peer's iteration mode for a set, read off its newton_schulz(): a set that does not
    cycle repeats its last triple."""
    import inspect
    source = inspect.getsource(getattr(muon_utils, "original_newton_schulz", muon_utils.newton_schulz))
    return "repeat_last" if f'"{name}"' in source.split("repeat_last_types")[1].split("\n")[0] \
        else "cycle"


def eo_newton_schulz_f64(muon_utils, x, name, steps):
    """The peer's iteration on a float64 matrix: its normalization (F.normalize, eps 1e-15),
    its transposition of tall inputs, its coefficient iterator and its step function."""
    y = torch.from_numpy(np.array(x, dtype=np.float64))
    tall = y.size(-2) > y.size(-1)
    if tall:
        y = y.mT
    y = torch.nn.functional.normalize(y, p=2, dim=(-2, -1), eps=1e-15)
    sets = muon_utils._COEFFICIENT_SETS[name]
    for a, b, c in muon_utils.get_coefficient_iterator(steps, sets, eo_repeat_mode(muon_utils, name)):
        y = muon_utils.newton_schulz_step(y, a, b, c)
    out = (y.mT if tall else y).numpy().copy()
    # the peer's own entry point, in float32 at full matmul precision, agrees to its rounding
    torch.set_float32_matmul_precision("highest")
    o32 = muon_utils.newton_schulz(torch.from_numpy(np.array(x, dtype=np.float32)), steps,
                                   coefficient_type=name).numpy().astype(np.float64)
    assert np.abs(o32 - out).max() < 1e-4, (name, np.abs(o32 - out).max())
    return out


def eo_float64(muon_utils):
    """Lets Emerging-Optimizers' optimizers run in float64: its newton_schulz() (float32
    only) is replaced by the same iteration in float64 (eo_newton_schulz_f64 without the
    float32 cross-check)."""
    def newton_schulz(x, steps, coefficient_type="quintic", **_):
        y = x.mT if x.size(-2) > x.size(-1) else x
        y = torch.nn.functional.normalize(y, p=2, dim=(-2, -1), eps=1e-15)
        sets = muon_utils._COEFFICIENT_SETS[coefficient_type]
        mode = eo_repeat_mode(muon_utils, coefficient_type)
        for a, b, c in muon_utils.get_coefficient_iterator(steps, sets, mode):
            y = muon_utils.newton_schulz_step(y, a, b, c)
        return y.mT if x.size(-2) > x.size(-1) else y
    if not hasattr(muon_utils, "original_newton_schulz"):
        muon_utils.original_newton_schulz = muon_utils.newton_schulz
    muon_utils.newton_schulz = newton_schulz


def polargrad_trajectory(eo_path, w0, grads, lr, mu, wd, nesterov, coefficients, extra):
    sys.path.insert(0, eo_path)
    from emerging_optimizers.orthogonalized_optimizers import muon_utils, polargrad
    eo_float64(muon_utils)
    return optimizer_trajectory(lambda params: polargrad.PolarGrad(
        params, lr=lr, momentum=mu, weight_decay=wd, nesterov=bool(nesterov),
        coefficient_type=coefficients, extra_scale_factor=extra), w0, grads)


def adaptive_trajectory(eo_path, method, w0, grads, lr, mu, wd, nesterov, coefficients, mode,
                        extra, beta2, eps):
    """Emerging-Optimizers' AdaptiveMuon with moment2_method `method`."""
    sys.path.insert(0, eo_path)
    from emerging_optimizers.orthogonalized_optimizers import adaptive_muon, muon_utils
    eo_float64(muon_utils)
    return optimizer_trajectory(lambda params: adaptive_muon.AdaptiveMuon(
        params, lr=lr, momentum=mu, weight_decay=wd, nesterov=bool(nesterov),
        coefficient_type=coefficients, scale_mode=mode, extra_scale_factor=extra,
        moment2_method=method, beta2=beta2, eps=eps), w0, grads)


# Emerging-Optimizers' scale modes as muon's (with the peer's extra_scale_factor as rms_factor
# under "spectral"; the other two with a factor of 1)
EO_SCALES = {"spectral": "match_rms_adamw", "shape_scaling": "original", "unit_rms_norm": "spectral"}

# Emerging-Optimizers' rules: kind, name, shape, options
EO_CASES = [
    ("polargrad", "defaults", (6, 4), dict(lr=3e-4, mu=0.95, wd=0.01, nesterov=0,
                                           coefficients="quintic", extra=1.0)),
    ("polargrad", "wide_nesterov", (3, 7), dict(lr=1e-3, mu=0.9, wd=0.1, nesterov=1,
                                                coefficients="simple", extra=0.2)),
    ("polargrad", "square_cans", (5, 5), dict(lr=5e-4, mu=0.8, wd=0.0, nesterov=0,
                                              coefficients="cans", extra=1.0)),
    ("adamuon", "spectral", (6, 4), dict(lr=0.002, mu=0.95, wd=0.1, nesterov=0,
                                         coefficients="quintic", mode="spectral", extra=0.2,
                                         beta2=0.95, eps=1e-8)),
    ("adamuon", "wide_nesterov", (3, 7), dict(lr=0.01, mu=0.9, wd=0.0, nesterov=1,
                                              coefficients="simple", mode="unit_rms_norm",
                                              extra=1.0, beta2=0.9, eps=1e-8)),
    ("adamuon", "square_shape", (5, 5), dict(lr=0.005, mu=0.8, wd=0.05, nesterov=0,
                                             coefficients="cans", mode="shape_scaling",
                                             extra=1.0, beta2=0.99, eps=1e-6)),
]
EO_SCHEDULES = {"quintic": "quintic", "simple": "simple", "cans": "cans"}

# AdaptiveMuon's other two methods on AdaMuon's cases: NorMuon under the peer's convention (a
# wide matrix per column, and one more wide case whose eps floors V), then NAMO
EO_ADAPTIVE_CASES = [("normuon_eo", name, shape, kw) for kind, name, shape, kw in EO_CASES
                     if kind == "adamuon"] + [
    ("normuon_eo", "wide_floor", (4, 9), dict(lr=0.005, mu=0.8, wd=0.05, nesterov=0,
                                              coefficients="cans", mode="shape_scaling",
                                              extra=1.0, beta2=0.99, eps=0.05)),
] + [("namo", name, shape, kw) for kind, name, shape, kw in EO_CASES if kind == "adamuon"]


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


def normuon_trajectory(normuon, w0, grads, lr, mu, beta2, wd, nesterov, adjust, split=None,
                       cautious=0):
    # dion makes its scalars with torch.tensor(x): float64 ones under this default, as the
    # golden files are (float32 ones would round mu and beta2 to float32 first)
    torch.set_default_dtype(torch.float64)
    extra = dict(split_sizes=tuple(int(n) for n in split.split("+"))) if split else {}
    return optimizer_trajectory(lambda params: normuon.NorMuon(
        [dict(params=params, **extra)], lr=lr, mu=mu, muon_beta2=beta2, weight_decay=wd,
        nesterov=bool(nesterov), adjust_lr=ADJUST[adjust], cautious_wd=bool(cautious),
        newton_schulz_func=newton_schulz_f64), w0, grads)


def load_dion_muon(path):
    sys.path.insert(0, path)
    import dion.muon as muon
    muon.muon_update_pre_orthogonalize = momentum_without_bf16
    muon.Muon._ensure_hyperparam_tensor = hyperparameter_f64
    return muon


def muon_trajectory(muon, w0, grads, lr, mu, wd, nesterov, adjust, cautious=0):
    """dion's Muon (sum momentum), single process, as NorMuon's above."""
    torch.set_default_dtype(torch.float64)
    return optimizer_trajectory(lambda params: muon.Muon(
        params, lr=lr, mu=mu, weight_decay=wd, cautious_wd=bool(cautious),
        nesterov=bool(nesterov), adjust_lr=ADJUST[adjust], newton_schulz_func=newton_schulz_f64),
        w0, grads)


def adamw_trajectory(dion, w0, grads, lr, beta1, beta2, eps, wd, cautious=0):
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    x = torch.from_numpy(np.array(w0, dtype=np.float64))
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    out = []
    for step, g in enumerate(grads, start=1):
        dion.adamw_update(x, torch.from_numpy(np.array(g, dtype=np.float64)), m, v, t(lr),
                          t(beta1), t(beta2), t(wd), t(step), eps, cautious_wd=bool(cautious))
        out.append(x.numpy().copy())
    return out


# Cautious weight decay (dion's cautious_wd) in every rule that decays: kind, name, shape,
# options. Large decays and few steps, so that the mask matters.
CAUTIOUS_CASES = [
    ("muon", "cautious_tall", (7, 4), dict(lr=0.02, mu=0.9, wd=2.0, nesterov=1,
                                           adjust="spectral", cautious=1)),
    ("muon", "cautious_wide", (3, 6), dict(lr=0.03, mu=0.95, wd=1.5, nesterov=0, adjust="rms",
                                           cautious=1)),
    ("muon", "plain_sum", (5, 5), dict(lr=0.02, mu=0.9, wd=0.5, nesterov=1, adjust="none",
                                       cautious=0)),
    ("normuon", "cautious", (6, 4), dict(lr=0.015625, mu=0.9, beta2=0.9, wd=2.0, nesterov=1,
                                         adjust="spectral", cautious=1)),
    ("lion", "cautious", (4, 5), dict(lr=0.01, beta1=0.9, beta2=0.99, wd=3.0, cautious=1)),
    ("adamw", "dion_cautious", (5, 3), dict(lr=0.01, beta1=0.9, beta2=0.95, eps=1e-8, wd=2.0,
                                            cautious=1)),
    ("adamw", "dion_plain", (4, 4), dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-8, wd=0.5,
                                         cautious=0)),
]


def load_dion(path):
    spec = importlib.util.spec_from_file_location(
        "dion_scalar_opts", os.path.join(path, "dion", "scalar_opts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lion_trajectory(dion, w0, grads, lr, beta1, beta2, wd, cautious=0):
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    x = torch.from_numpy(np.array(w0, dtype=np.float64))
    m = torch.zeros_like(x)
    out = []
    for g in grads:
        dion.lion_update(x, torch.from_numpy(np.array(g, dtype=np.float64)), m, t(lr), t(beta1),
                         t(beta2), t(wd), cautious_wd=bool(cautious))
        out.append(x.numpy().copy())
    return out


def write_trajectories(outdir, lines, rng, cases, peers, steps):
    """For each (kind, name, shape, options) case: a random w0 and `steps` gradients from rng,
    the peer's trajectory, written to <kind>_<name>.npy (w0, g_1..g_T, w_1..w_T), and its line
    appended to `lines`."""
    for kind, name, shape, kw in cases:
        w0 = rng.standard_normal(shape)
        grads = [rng.standard_normal(shape) for _ in range(steps)]
        traj = peers[kind](w0, grads, **kw)
        np.save(os.path.join(outdir, f"{kind}_{name}.npy"), np.stack([w0] + grads + traj))
        lines.append(f"{kind} {name} {','.join(map(str, shape))} " +
                     " ".join(f"{k}={v}" for k, v in kw.items()))


def generate(outdir, dion, dion_path, muon_utils, eo_path):
    lines = ["# written by tests/reference/peer_reference.py generate; do not edit",
             "# kind name shape key=value... ; files: <kind>_<name>.npy (w0, g_1..g_T, w_1..w_T)"]
    normuon = load_dion_normuon(dion_path)
    peers = dict(muon=lambda w, g, **kw: muon_trajectory(load_dion_muon(dion_path), w, g, **kw),
                 normuon=lambda w, g, **kw: normuon_trajectory(normuon, w, g, **kw),
                 lion=lambda w, g, **kw: lion_trajectory(dion, w, g, **kw),
                 adamw=lambda w, g, **kw: adamw_trajectory(dion, w, g, **kw),
                 polargrad=lambda w, g, **kw: polargrad_trajectory(eo_path, w, g, **kw),
                 adamuon=lambda w, g, **kw: adaptive_trajectory(eo_path, "adamuon", w, g, **kw),
                 namo=lambda w, g, **kw: adaptive_trajectory(eo_path, "namo", w, g, **kw),
                 normuon_eo=lambda w, g, **kw: adaptive_trajectory(eo_path, "normuon", w, g, **kw))
    rng = np.random.default_rng(20261204)
    write_trajectories(outdir, lines, rng, [("lion",) + c for c in LION_CASES], peers, 5)
    write_trajectories(outdir, lines, rng, [("normuon",) + c for c in NORMUON_CASES], peers, 5)
    rng = np.random.default_rng(20261205)  # a stream of its own: the cases above stay as they were
    for name, schedule, shape, steps in NSSET_CASES:
        x = rng.standard_normal(shape)
        o = eo_newton_schulz_f64(muon_utils, x, name, steps)
        case = f"{schedule}_{steps}_{shape[0]}x{shape[1]}"
        np.save(os.path.join(outdir, f"nsset_{case}.npy"), np.stack([x, o]))
        lines.append(f"nsset {case} {','.join(map(str, shape))} schedule={schedule} steps={steps}")
    write_trajectories(outdir, lines, np.random.default_rng(20261206), CAUTIOUS_CASES, peers, 4)
    write_trajectories(outdir, lines, np.random.default_rng(20261207), EO_CASES, peers, 4)
    write_trajectories(outdir, lines, np.random.default_rng(20261208), EO_ADAPTIVE_CASES, peers, 4)
    with open(os.path.join(outdir, "peer_cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


def lion_trial(dion, rng, trial):
    """A random Lion case: its shape, its peer and its muon-cli flags."""
    shape = [(6,), (5, 7), (4, 3, 2)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-4, 3e-2)), beta1=float(rng.uniform(0, 0.99)),
              beta2=float(rng.uniform(0.5, 0.999)), wd=float(rng.uniform(0, 3)),
              cautious=int(rng.integers(0, 2)))
    flags = ["--lr", repr(kw["lr"]), "--beta1", repr(kw["beta1"]), "--beta2", repr(kw["beta2"]),
             "--weight-decay", repr(kw["wd"])] + cautious_flag(kw)
    return shape, kw, flags, lambda w, g: lion_trajectory(dion, w, g, **kw)


def cautious_flag(kw):
    return ["--cautious-weight-decay", "on" if kw["cautious"] else "off"]


def adamw_trial(dion, rng, trial):
    """A random AdamW case (dion's adamw_update, cautious decay or not)."""
    shape = [(6,), (5, 7), (4, 3, 2)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-4, 3e-2)), beta1=float(rng.uniform(0.5, 0.99)),
              beta2=float(rng.uniform(0.5, 0.999)), eps=1e-8, wd=float(rng.uniform(0, 3)),
              cautious=int(rng.integers(0, 2)))
    flags = ["--lr", repr(kw["lr"]), "--beta1", repr(kw["beta1"]), "--beta2", repr(kw["beta2"]),
             "--eps", repr(kw["eps"]), "--weight-decay", repr(kw["wd"])] + cautious_flag(kw)
    return shape, kw, flags, lambda w, g: adamw_trajectory(dion, w, g, **kw)


def dion_matrix_trial(rng, trial, **more):
    """A random case of a dion matrix rule: its shape, its Muon options (and `more`, each drawn
    by its function of rng) and the muon-cli flags of those."""
    shape = [(6, 4), (3, 7), (5, 5)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-3, 3e-2)), mu=float(rng.uniform(0.5, 0.99)),
              wd=float(rng.uniform(0, 3)), nesterov=int(rng.integers(0, 2)),
              adjust=["spectral", "rms", "none"][int(rng.integers(0, 3))],
              cautious=int(rng.integers(0, 2)), **{k: f(rng) for k, f in more.items()})
    scales = {"spectral": "spectral", "rms": "match_rms_adamw", "none": "none"}
    flags = ["--lr", repr(kw["lr"]), "--momentum", repr(kw["mu"]), "--momentum-form", "sum",
             "--weight-decay", repr(kw["wd"]), "--nesterov", "on" if kw["nesterov"] else "off",
             "--scale", scales[kw["adjust"]]] + cautious_flag(kw)
    flags += sum((["--" + k, repr(kw[k])] for k in more), [])
    return shape, kw, flags


def muon_trial(muon, rng, trial):
    """A random case of dion's Muon (sum momentum, cautious decay or not)."""
    shape, kw, flags = dion_matrix_trial(rng, trial)
    return shape, kw, flags, lambda w, g: muon_trajectory(muon, w, g, **kw)


def normuon_trial(normuon, rng, trial):
    """A random case of dion's NorMuon."""
    shape, kw, flags = dion_matrix_trial(rng, trial, beta2=lambda r: float(r.uniform(0.5, 0.999)))
    return shape, kw, flags, lambda w, g: normuon_trajectory(normuon, w, g, **kw)


def polargrad_trial(eo_path, rng, trial):
    """A random PolarGrad case (Emerging-Optimizers' PolarGrad)."""
    shape = [(6, 4), (3, 7), (5, 5)][trial % 3]
    kw = dict(lr=float(rng.uniform(1e-4, 3e-3)), mu=float(rng.uniform(0.5, 0.99)),
              wd=float(rng.uniform(0, 0.2)), nesterov=int(rng.integers(0, 2)),
              coefficients=["quintic", "simple", "cans"][int(rng.integers(0, 3))],
              extra=float(rng.uniform(0.1, 2)))
    flags = ["--lr", repr(kw["lr"]), "--momentum", repr(kw["mu"]), "--weight-decay",
             repr(kw["wd"]), "--nesterov", "on" if kw["nesterov"] else "off", "--schedule",
             EO_SCHEDULES[kw["coefficients"]], "--extra-scale", repr(kw["extra"])]
    return shape, kw, flags, lambda w, g: polargrad_trajectory(eo_path, w, g, **kw)


def adaptive_trial(eo_path, method, rng, trial):
    """A random case of Emerging-Optimizers' AdaptiveMuon with moment2_method `method`
    (adamuon, namo, normuon: muon's rule of that name, normuon under the peer's convention)."""
    shape = [(6, 4), (3, 7), (5, 5)][trial % 3]
    mode = ["spectral", "shape_scaling", "unit_rms_norm"][int(rng.integers(0, 3))]
    kw = dict(lr=float(rng.uniform(1e-4, 1e-2)), mu=float(rng.uniform(0.5, 0.99)),
              wd=float(rng.uniform(0, 0.2)), nesterov=int(rng.integers(0, 2)),
              coefficients=["quintic", "simple", "cans"][int(rng.integers(0, 3))], mode=mode,
              extra=float(rng.uniform(0.1, 1)) if mode == "spectral" else 1.0,
              beta2=float(rng.uniform(0.5, 0.999)),
              eps=float(10 ** rng.uniform(-8, -1)) if method == "normuon" else 1e-8)
    flags = ["--lr", repr(kw["lr"]), "--momentum", repr(kw["mu"]), "--weight-decay",
             repr(kw["wd"]), "--nesterov", "on" if kw["nesterov"] else "off", "--schedule",
             EO_SCHEDULES[kw["coefficients"]], "--scale", EO_SCALES[mode], "--rms-factor",
             repr(kw["extra"]), "--beta2", repr(kw["beta2"])]
    if method == "normuon":  # muon's NorMuon has dion's defaults: set what differs
        flags += ["--convention", "emerging_optimizers", "--row-eps", repr(kw["eps"]),
                  "--momentum-form", "ema"]
    else:
        flags += ["--moment-eps", repr(kw["eps"])]
    return shape, kw, flags, lambda w, g: adaptive_trajectory(eo_path, method, w, g, **kw)


def check_cli(cli, rules, seed):
    """Runs `muon-cli step --rule NAME` on random trajectories of each rule (name, trials,
    make_trial, peer, float64 tolerance) in float64 and float32 and compares its last weights
    with the peer's."""
    rng = np.random.default_rng(seed)
    float32_products = {**os.environ, "MUON_NS_PRECISION": "float32"}
    with tempfile.TemporaryDirectory() as tmp:
        for rule, trials, make_trial, peer, tol64 in rules:
            worst, checks, largest = 0.0, 0, {"float64": 0.0, "float32": 0.0}
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
                    # float32 Newton-Schulz products, as the peers multiply: on a CPU with
                    # AVX512-BF16 muon's automatic precision would run them in bf16
                    subprocess.run(args, check=True, env=float32_products)
                    got = np.load(os.path.join(tmp, "out.npy")).astype(np.float64)
                    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
                    worst = max(worst, err / tol)
                    largest[dtype] = max(largest[dtype], err)
                    checks += 1
                    if err > tol:
                        print(f"MISMATCH {rule} {dtype} {shape} {kw}: error {err:.3g} > {tol:g}")
                        return 1
            print(f"seed {seed}: {checks} {rule} trajectories match {peer} "
                  f"(worst error {worst:.3g} of its tolerance; largest relative deviation "
                  f"{largest['float64']:.2g} in float64, {largest['float32']:.2g} in float32)")
    return 0


def main():
    args = sys.argv[1:]
    if "--dion" not in args or len(args) < 4:
        print(__doc__)
        return 2
    dion = load_dion(args[args.index("--dion") + 1])
    if args[0] == "generate":
        if "--eo" not in args:
            print(__doc__)
            return 2
        generate(args[1], dion, args[args.index("--dion") + 1],
                 load_eo(args[args.index("--eo") + 1]), args[args.index("--eo") + 1])
        return 0
    if args[0] == "check-cli":
        seed = int(args[args.index("--seed") + 1]) if "--seed" in args else \
            int.from_bytes(os.urandom(4), "little")
        normuon = load_dion_normuon(args[args.index("--dion") + 1])
        muon = load_dion_muon(args[args.index("--dion") + 1])
        eo = [("polargrad", 6, lambda rng, t: polargrad_trial(args[args.index("--eo") + 1], rng, t),
               "Emerging-Optimizers' PolarGrad", 1e-10),
              ("adamuon", 6, lambda rng, t: adaptive_trial(args[args.index("--eo") + 1], "adamuon", rng, t),
               "Emerging-Optimizers' AdaptiveMuon", 1e-10),
              ("namo", 6, lambda rng, t: adaptive_trial(args[args.index("--eo") + 1], "namo", rng, t),
               "Emerging-Optimizers' AdaptiveMuon (namo)", 1e-10),
              ("normuon", 6, lambda rng, t: adaptive_trial(args[args.index("--eo") + 1], "normuon", rng, t),
               "Emerging-Optimizers' AdaptiveMuon (normuon)", 1e-10)] if "--eo" in args else []
        return check_cli(args[1], eo + [
            ("lion", 8, lambda rng, t: lion_trial(dion, rng, t), "dion's lion_update", 1e-12),
            ("adamw", 6, lambda rng, t: adamw_trial(dion, rng, t), "dion's adamw_update", 1e-12),
            ("muon", 6, lambda rng, t: muon_trial(muon, rng, t), "dion's Muon", 1e-10),
            # Newton-Schulz in another order of products than the peer's: 1e-10
            ("normuon", 6, lambda rng, t: normuon_trial(normuon, rng, t), "dion's NorMuon", 1e-10),
        ], seed)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
