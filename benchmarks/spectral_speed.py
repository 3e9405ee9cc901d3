"""How fast is the RKSP v2 spectral core on this CPU?  Side-by-side timings in one process.

(a) One block at d = 576, N = 2048: the full v2 features (``profile_block`` with ``RKSPConfig()``: full
    DMD, k = 576 eigenvalues, every feature including the Kreiss constant) against issue 13's target
    (<= 0.3 s), and the same steps one by one as ``features_of`` runs them: whiten, operator, eigen
    (torch.linalg.eig, then V^-1 from the real basis of the conjugate pairs), kappa (||Wr|| ||Wr^-1|| by
    Lanczos), residuals (ResDMD, real arithmetic), eta, kreiss; "other" is the rest of ``profile_block``
    (masses, quantiles, the record).  Snapshots: X (N x d) Gaussian with a decaying spectrum (singular
    values ~ i^-1/2 on a random basis), Y = X + f(X) with f a random two-layer GELU MLP (width 4d).
(b) d = 4096, N = 2048 (LLaMA-2-7B width): the forward of one LLaMA-2-7B-shaped decoder block
    (transformers ``LlamaDecoderLayer``, hidden 4096, MLP 11008, 32 heads, random init, float32, SDPA
    causal attention) on 4 sequences of 512 tokens with rotary embeddings from ``LlamaRotaryEmbedding``,
    and, as multiples of that forward, on its (X, Y) = (input, output) token states: the full operator and
    its eigenvalues (k = 2047), rank-32 randomized DMD with all features (``RKSPConfig(rank=32)``), and
    ``--rank full`` with every feature including Kreiss (``RKSPConfig()``), with its breakdown.

    python -m benchmarks.spectral_speed                  # table (the 7B part takes minutes)
    python -m benchmarks.spectral_speed --skip-7b        # (a) only
    python -m benchmarks.spectral_speed --json           # one JSON line
    python -m benchmarks.spectral_speed --repeat 5       # median of 5 runs per figure (default 3)
    python -m benchmarks.spectral_speed --threads 1      # torch threads

Each figure is the median over ``--repeat`` runs (the full-rank 7B profile: over max(1, repeat // 3)),
with torch's default thread count or ``--threads`` (reported).  On a machine whose cores are shared with
other work, more threads than free cores can make LAPACK calls (eig, eigh) many times slower.  Timings on
a shared machine are noisy: compare figures of one run with each other, not across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch


from hf_rksp.spectral import RKSPConfig, dmd_operator, nonlinearity_ratio, profile_block, whiten  # noqa: E402
from hf_rksp.spectral.features import _decompose, _kappa, _residuals  # noqa: E402  (features_of's own steps)
from hf_rksp.spectral.kreiss import _kreiss  # noqa: E402

STEPS = ("whiten", "operator", "eigen", "kappa", "residuals", "eta", "kreiss")
TARGET_S = 0.3  # issue 13: full v2 features of one block at d = 576, N = 2048


def snapshots(d: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X with a decaying spectrum, Y = X + GELU(X W1) W2 (float32, N x d)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q
    spectrum = torch.arange(1, d + 1, dtype=torch.float64) ** -0.5
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * spectrum) @ basis.T
    x = (x / x.pow(2).mean().sqrt()).float()  # unit RMS entries
    w1 = torch.randn(d, 4 * d, generator=g) / math.sqrt(d)
    w2 = torch.randn(4 * d, d, generator=g) / math.sqrt(4 * d)
    return x, x + torch.nn.functional.gelu(x @ w1) @ w2


def timed(fn, repeat: int):
    """(median seconds, last result) over ``repeat`` calls."""
    times, out = [], None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def breakdown(x: torch.Tensor, y: torch.Tensor, config: RKSPConfig, repeat: int) -> dict[str, float]:
    """Seconds per step of ``features_of`` (median over ``repeat``), plus the end-to-end ``profile_block``."""
    out: dict[str, list[float]] = {k: [] for k in (*STEPS, "total")}
    for _ in range(max(1, repeat)):
        t = [time.perf_counter()]
        wh = whiten(x, y, eps=config.eps, rel_cut=config.rel_cut)
        t.append(time.perf_counter())
        op = dmd_operator(wh, config.rank, generator=torch.Generator().manual_seed(0),
                          oversample=config.oversample, power_iters=config.power_iters)
        t.append(time.perf_counter())
        dec = _decompose(op)
        t.append(time.perf_counter())
        _kappa(dec)
        t.append(time.perf_counter())
        _residuals(op, dec, config.eps_r)
        t.append(time.perf_counter())
        nonlinearity_ratio(op, wh, config.eps_nl)
        t.append(time.perf_counter())
        _kreiss(dec.lam, dec.vec, dec.inv, basis=dec.basis)
        t.append(time.perf_counter())
        for k, a, b in zip(STEPS, t, t[1:]):
            out[k].append(b - a)
        t0 = time.perf_counter()
        profile_block(x, y, config, generator=torch.Generator().manual_seed(0))
        out["total"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def part_a(repeat: int) -> dict:
    d, n = 576, 2048
    x, y = snapshots(d, n)
    feats = profile_block(x, y, RKSPConfig())
    res = breakdown(x, y, RKSPConfig(), repeat)
    return dict(d=d, n=n, m=feats.m, total=res.pop("total"), target=TARGET_S, breakdown=res,
                rho=feats.spectral_radius,
                eigvec_condition=feats.eigvec_condition, kreiss_constant=feats.kreiss_constant)


def part_b(repeat: int) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).float().eval()
    rope = LlamaRotaryEmbedding(cfg)
    batch, seq = 4, 512
    hidden = torch.randn(batch, seq, cfg.hidden_size)
    position_ids = torch.arange(seq)[None, :].expand(batch, -1)
    with torch.no_grad():
        pos = rope(hidden, position_ids)
        forward = lambda: layer(hidden, attention_mask=None, position_ids=position_ids,  # noqa: E731
                                position_embeddings=pos)
        forward()  # warm-up
        t_fwd, out = timed(forward, repeat)
    x = hidden.reshape(-1, cfg.hidden_size)
    y = (out[0] if isinstance(out, tuple) else out).reshape(-1, cfg.hidden_size)

    def operator_and_eigenvalues():
        op = dmd_operator(whiten(x, y))
        return op.m, torch.linalg.eigvals(op.matrix)

    t_eigvals, (k, _) = timed(operator_and_eigenvalues, repeat)
    t_r32, _ = timed(lambda: profile_block(x, y, RKSPConfig(rank=32), generator=torch.Generator().manual_seed(0)),
                     repeat)
    full = breakdown(x, y, RKSPConfig(), max(1, repeat // 3))
    feats = profile_block(x, y, RKSPConfig())
    return dict(d=cfg.hidden_size, n=x.shape[0], k=k, forward=t_fwd, operator_eigenvalues=t_eigvals,
                rank32_all_features=t_r32, full_all_features=full["total"],
                full_breakdown={s: full[s] for s in STEPS}, rho=feats.spectral_radius,
                eigvec_condition=feats.eigvec_condition, kreiss_constant=feats.kreiss_constant)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median; default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--skip-7b", action="store_true", help="only the d = 576 block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "repeat": args.repeat, "a": part_a(args.repeat)}
    result["a"]["load_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # before, after (a)
    if not args.skip_7b:
        result["b"] = part_b(args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0
    a = result["a"]
    print(f"torch {result['torch']}, {result['threads']} threads; median of {args.repeat} runs")
    print(f"\n(a) one block, d = {a['d']}, N = {a['n']}: full DMD, m = {a['m']} (rho {a['rho']:.3g}, "
          f"kappa(V) {a['eigvec_condition']:.4g}, K {a['kreiss_constant']:.4g}); 1-min load average "
          f"{a['load_1min'][0]:.2f} before, {a['load_1min'][1]:.2f} after")
    verdict = "met" if a["total"] <= TARGET_S else "NOT met"
    print(f"    {'profile_block (all v2 features)':34s} {a['total'] * 1e3:9.1f} ms   target <= {TARGET_S * 1e3:.0f} ms: "
          f"{verdict}")
    for s in STEPS:
        print(f"      {s:32s} {a['breakdown'][s] * 1e3:9.1f} ms")
    other = a["total"] - sum(a["breakdown"].values())
    print(f"      {'other (sum of steps vs total)':32s} {other * 1e3:9.1f} ms")
    if "b" in result:
        b = result["b"]
        f = b["forward"]
        print(f"\n(b) d = {b['d']}, N = {b['n']} (4 x 512 tokens): LLaMA-2-7B-shaped decoder block, float32")
        print(f"    {'block forward':40s} {f:9.2f} s   1.00 x")
        for label, key in (("full operator + eigenvalues (k = %d)" % b["k"], "operator_eigenvalues"),
                           ("rank-32 DMD, all features", "rank32_all_features"),
                           ("--rank full, all features + Kreiss", "full_all_features")):
            print(f"    {label:40s} {b[key]:9.2f} s {b[key] / f:6.2f} x")
        for s in STEPS:
            print(f"      {s:38s} {b['full_breakdown'][s]:9.2f} s {b['full_breakdown'][s] / f:6.2f} x")
        print(f"    (full: rho {b['rho']:.3g}, kappa(V) {b['eigvec_condition']:.4g}, K {b['kreiss_constant']:.4g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
