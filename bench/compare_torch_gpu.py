#!/usr/bin/env python3
"""Runs muon_cuda_bench and the PyTorch references on the same GPU; prints one table of ratios.

    python3 bench/compare_torch_gpu.py build/bench/muon_cuda_bench [--quick]

References (PyTorch, bf16 like muon's NS):
  reference  the NS5 loop of Jordan et al. (2024) written out in PyTorch:
             X = G.bfloat16() / (||G|| + 1e-7), transposed to the short side, then per step
             A = X X^T; B = b A + c A A; X = a X + B X
  torch.Muon torch.optim.Muon's own Newton-Schulz (torch.optim._muon), where this PyTorch has it
  step       torch.optim.Muon on the matrices + torch.optim.AdamW on the rest, fp32 parameters
The batch-of-64 case runs the reference once per matrix (what a per-matrix loop costs) and also
batched over the stack (X @ X.mT on a 3-D tensor).
"""
import statistics
import subprocess
import sys

import torch

COEFFS = (3.4445, -4.7750, 2.0315)


def reference_ns5(g, steps=5, eps=1e-7):
    a, b, c = COEFFS
    x = g.bfloat16()
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.mT if transposed else x


def torch_muon_ns():
    try:
        from torch.optim import _muon
    except ImportError:
        return None
    fn = getattr(_muon, "_zeropower_via_newtonschulz", None)
    if fn is None:
        return None
    return lambda g: fn(g, COEFFS, 5, 1e-7)


def time_ms(fn, warmup=3, reps=20):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def ns_flops(m, n, batch, steps=5):
    k, N = min(m, n), max(m, n)
    return batch * steps * (4 * k * k * N + 2 * k ** 3)


def torch_step_ms(matrices, vectors, embedding):
    torch.manual_seed(0)
    mats = [torch.randn(r, c, device="cuda") * 0.02 for r, c in matrices]
    rest = [torch.randn(1, v, device="cuda") * 0.02 for v in vectors]
    rest.append(torch.randn(*embedding, device="cuda") * 0.02)
    for p in mats + rest:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p)
    muon = torch.optim.Muon(mats, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01)

    def step():
        muon.step()
        adamw.step()

    return time_ms(step, warmup=2, reps=10)


def main():
    exe, args = sys.argv[1], sys.argv[2:]
    out = subprocess.run([exe, *args], capture_output=True, text=True, check=True).stdout
    print(out)
    rows = [line.split(",") for line in out.splitlines() if line and not line.startswith(("#", "kind"))]
    peak = next(float(r[5]) for r in rows if r[0] == "peak")
    ns_muon = torch_muon_ns()
    print(f"cuBLAS bf16 GEMM peak (this run): {peak:.0f} GFLOP/s")
    print(f"{'NS5':<22}{'muon ms':>9}{'GFLOP/s':>9}{'%peak':>7}{'ref ms':>9}{'ref/muon':>9}"
          f"{'torch.Muon ms':>14}{'ratio':>7}")
    for kind, name, prec, batch, ms, gflops in rows:
        if kind != "ns" or prec != "bf16":
            continue
        m, n = map(int, name.split("x"))
        batch, ms, gflops = int(batch), float(ms), float(gflops)
        g = torch.randn(batch, m, n, device="cuda") if batch > 1 else torch.randn(m, n, device="cuda")
        if batch > 1:
            ref = time_ms(lambda: [reference_ns5(g[i]) for i in range(batch)])
            ref_batched = time_ms(lambda: reference_ns5(g))
        else:
            ref = time_ms(lambda: reference_ns5(g))
        tm = ""
        tm_ratio = ""
        if ns_muon is not None:
            if batch > 1:
                t = time_ms(lambda: [ns_muon(g[i]) for i in range(batch)])
            else:
                t = time_ms(lambda: ns_muon(g))
            tm, tm_ratio = f"{t:.3f}", f"{t / ms:.2f}"
        label = f"{name} x{batch}" if batch > 1 else name
        print(f"{label:<22}{ms:>9.3f}{gflops:>9.0f}{100 * gflops / peak:>6.0f}%{ref:>9.3f}"
              f"{ref / ms:>9.2f}{tm:>14}{tm_ratio:>7}")
        if batch > 1:
            print(f"{'  (ref batched 3-D)':<22}{'':>9}{'':>9}{'':>7}{ref_batched:>9.3f}"
                  f"{ref_batched / ms:>9.2f}")
    for kind, name, prec, batch, ms, gflops in rows:
        if kind == "ns" and prec != "bf16":
            print(f"NS5 {name} {prec}: {float(ms):.3f} ms, {float(gflops):.0f} GFLOP/s")
    print(f"\nbf16 NS5 variants (GFLOP/s counts the reference loop's flops)")
    for kind, name, prec, batch, ms, gflops in rows:
        if kind == "variant":
            print(f"  {name:<28}{float(ms):>9.3f} ms{float(gflops):>9.0f} GFLOP/s")
    sets = {
        "gpt2-small": ([(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12,
                       [768, 768, 2304, 768, 768, 768, 3072, 768] * 12, (50257, 768)),
        "1b-like": ([(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)] * 24,
                    [2048, 2048, 6144, 2048, 2048, 2048, 8192, 2048] * 24, (50257, 2048)),
    }
    print(f"\n{'whole step':<32}{'muon ms':>9}{'torch ms':>10}{'torch/muon':>11}")
    for kind, name, prec, batch, ms, gflops in rows:
        if kind != "step":
            continue
        t = torch_step_ms(*sets[name])
        print(f"{name + ' (' + prec + ')':<32}{float(ms):>9.2f}{t:>10.2f}{t / float(ms):>11.2f}")


if __name__ == "__main__":
    main()
