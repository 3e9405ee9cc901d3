"""Where the paper's KSS loss alone puts eigenvalues: minimize L_l (Eq. 14) over r free moduli, per beta.

Why beta matters little and why the loss needs the task loss beside it: softplus(x) is not zero
below tau_u (softplus(-0.1)^2 = 0.41), so the unstable penalty, a *sum* over the r eigenvalues, keeps
pushing moduli below the band, and the near-unit target, a *mean*, cannot hold them in it.  This
prints, for r = 32 moduli started all at 1.0 or spread over [0.5, 1.3], the moduli and the hard
near-unit mass where gradient descent on L_l alone settles.

    python -m benchmarks.kss_equilibrium [--json]
"""

from __future__ import annotations

import argparse
import json

import torch


from hf_rksp.spectral import kss_penalty  # noqa: E402


def settle(start: torch.Tensor, beta: float, steps: int = 20000, lr: float = 0.01) -> torch.Tensor:
    m = start.clone().requires_grad_()
    opt = torch.optim.SGD([m], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        kss_penalty(m.to(torch.complex128), beta=beta).backward()
        opt.step()
    return m.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--r", type=int, default=32)
    a = p.parse_args(argv)
    starts = {"all at 1.0": torch.ones(a.r, dtype=torch.float64),
              "spread 0.5-1.3": torch.linspace(0.5, 1.3, a.r, dtype=torch.float64)}
    rows = []
    for name, start in starts.items():
        for beta in (1, 4, 16, 64):
            m = settle(start, beta)
            rows.append({"start": name, "beta": beta, "modulus_min": float(m.min()), "modulus_max": float(m.max()),
                         "near_unit_mass": float(((m >= 0.90) & (m <= 1.05)).double().mean()),
                         "expansive_mass": float((m > 1.05).double().mean())})
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['start']:>15}  beta {r['beta']:>3}: moduli {r['modulus_min']:.3f}-{r['modulus_max']:.3f}, "
                  f"M_~1 {r['near_unit_mass']:.2f}, M_>1 {r['expansive_mass']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
