"""The spectral core against an independent float64 numpy reference and against PyDMD.

Eigenvalues are compared as multisets by optimal matching (linear_sum_assignment
on |a_i - b_j|): sorting complex numbers is fragile when moduli tie.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy.optimize import linear_sum_assignment

from hf_rksp.blocks import find_blocks
from hf_rksp.capture import capture_snapshots
from hf_rksp.spectral import block_spectrum, spectral_features, whiten


def reference(x: np.ndarray, y: np.ndarray, rank: int, delta: float, rel_tol: float = 1e-6):
    """RKSP v1 written from the definition with numpy only: full SVD, pinv, eigvals."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    r = int(min(rank, x.shape[0] - 1, x.shape[1], np.sum(s > rel_tol * s[0])))
    v, sr = vt[:r].T, s[:r]
    zx, zy = xc @ v / sr, yc @ v / sr
    k = np.linalg.pinv(zx) @ zy
    lam = np.linalg.eigvals(k)
    mod = np.abs(lam)
    return {
        "eigenvalues": lam,
        "near_unit_mass": float(np.mean(np.abs(mod - 1) <= delta)),
        "spectral_radius": float(mod.max()),
        "outside_mass": float(np.mean(mod > 1 + delta)),
        "fit_r2": float(1 - np.sum((zy - zx @ k) ** 2) / np.sum(zy**2)),
        "rank": r,
        "cond": float(sr[0] / sr[-1]),
        "zx": zx,
        "zy": zy,
    }


def match_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    rows, cols = linear_sum_assignment(np.abs(a[:, None] - b[None, :]))
    return float(np.abs(a[rows] - b[cols]).max())


def mass_close(got: float, ref_mod: np.ndarray, delta: float, tol: float, n: int) -> None:
    """Counts may differ only by eigenvalues whose modulus is within ``tol`` of a band edge."""
    edge = np.sum(np.minimum(np.abs(np.abs(ref_mod - 1) - delta), np.inf) <= tol)
    assert abs(got - float(np.mean(np.abs(ref_mod - 1) <= delta))) <= edge / n + 1e-12


def tiny_snapshots(family: str, n_seq: int = 4, seq: int = 64):
    torch.manual_seed(0)
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_config(family)).eval()
    ids = torch.randint(0, 512, (n_seq, seq), generator=torch.Generator().manual_seed(1))
    _, blocks = find_blocks(model)
    return capture_snapshots(model, blocks, ids, batch_size=n_seq, progress=False)


# Tolerances, relative to max(1, |lambda|max):
# - exact: float64 SVD on both sides of the same float32 data; errors ~ eps * cond(Xc_r) * growth,
#   cond <= 1e3 here, so 1e-9 leaves a wide margin.
# - gram: eigen-decomposition of Xc^T Xc squares the condition number: error ~ eps * cond^2;
#   we allow 1e-12 * cond^2 (>= 1e-9), i.e. 1e4 x eps*cond^2.
# - randomized64: the range finder is exact when the requested rank >= the numerical rank of Xc
#   (N > d here and rank = d), so with float64 work it must match as tightly as gram.
# - randomized (the audit's setting: float32 range finder and projections, float64 r x r algebra):
#   the data enter at float32 rounding, which whitening magnifies by cond(Xc_r); the eigenvalue
#   error measured here is <= 7 * eps32 * cond, and we allow 100 * eps32 * cond.
EPS32 = float(torch.finfo(torch.float32).eps)
METHODS = {"exact": ("exact", None), "gram": ("gram", None), "randomized64": ("randomized", torch.float64),
           "randomized": ("randomized", torch.float32)}


def tolerance(method: str, cond: float) -> float:
    if method == "exact":
        return 1e-9
    if method == "randomized":
        return 100 * EPS32 * cond
    return max(1e-9, 1e-12 * cond**2)


def spectrum(x, y, method: str, **kw):
    name, work = METHODS[method]
    return block_spectrum(x, y, method=name, work_dtype=work or torch.float32, **kw)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_tiny_model_blocks_match_float64_reference(family, method):
    snaps = tiny_snapshots(family)
    for i, (x, y) in enumerate(zip(snaps.inputs, snaps.outputs)):
        ref = reference(x.numpy(), y.numpy(), rank=256, delta=0.05)
        got = spectrum(x, y, method, rank=256, delta=0.05)
        tol = tolerance(method, ref["cond"])
        scale = max(1.0, ref["spectral_radius"])
        assert got.rank_used == ref["rank"] == 64
        assert match_error(got.eigenvalues.numpy(), ref["eigenvalues"]) <= tol * scale, (i, method)
        assert got.spectral_radius == pytest.approx(ref["spectral_radius"], rel=tol, abs=tol)
        assert got.fit_r2 == pytest.approx(ref["fit_r2"], abs=tol)
        mod = np.abs(ref["eigenvalues"])
        mass_close(got.near_unit_mass, mod, 0.05, tol * scale, ref["rank"])
        assert got.outside_mass == pytest.approx(float(np.mean(mod > 1.05)), abs=1 / ref["rank"])


@pytest.mark.parametrize("method", list(METHODS))
def test_truncated_rank_matches_reference(method):
    """rank < d: the top-r subspace must be found; a decaying spectrum keeps it well separated."""
    g = np.random.default_rng(0)
    n, d, r = 600, 80, 24
    x = g.standard_normal((n, d)) * np.logspace(0, -2, d)
    y = x @ (np.eye(d) + 0.3 * g.standard_normal((d, d)) / np.sqrt(d))
    ref = reference(x, y, rank=r, delta=0.05)
    gen = torch.Generator().manual_seed(0)
    q = 4
    got = spectrum(torch.from_numpy(x), torch.from_numpy(y), method, rank=r, generator=gen, niter=q)
    if method.startswith("randomized"):
        # Halko et al. (2011): with p = 16 oversamples (max(16, r // 2), r = 24) and q power iterations
        # the subspace error scales as (s_{r+p} / s_r)^(2q+1); 10x that bounds the eigenvalue error
        # (~3e-4 here, far above float32 rounding).
        s = np.linalg.svd(x - x.mean(0), compute_uv=False)
        tol = 10 * (s[r + 16] / s[r - 1]) ** (2 * q + 1)
    else:
        tol = 1e-8  # float64 subspaces on both sides, cond(Xc_r) ~ 30
    assert got.rank_used == r
    assert match_error(got.eigenvalues.numpy(), ref["eigenvalues"]) <= tol * max(1, ref["spectral_radius"])
    assert got.fit_r2 == pytest.approx(ref["fit_r2"], abs=tol)


def test_known_linear_map_recovered_to_1e8():
    g = np.random.default_rng(1)
    n, d = 512, 32
    lams = np.concatenate([
        [1.0, -1.0, 0.5, 1.2, 0.97, 1.04],  # reals: on, inside and outside the band
        np.exp(1j * np.array([0.3, 1.1, 2.0])),  # on the unit circle
        0.6 * np.exp(1j * np.array([0.5, 2.5])),
        1.5 * np.exp(1j * np.array([0.9])),
    ])
    lams = np.concatenate([lams, np.conj(lams[np.abs(lams.imag) > 0])])
    reals = g.uniform(0.1, 0.8, d - len(lams))
    lams = np.concatenate([lams, reals])
    # real block-diagonal matrix with these eigenvalues, then a random similarity
    blocks = []
    for lam in lams[np.abs(lams.imag) == 0]:
        blocks.append(np.array([[lam.real]]))
    for lam in lams[lams.imag > 0]:
        blocks.append(np.array([[lam.real, -lam.imag], [lam.imag, lam.real]]))
    from scipy.linalg import block_diag

    a = block_diag(*blocks)
    p = g.standard_normal((d, d))
    a = np.linalg.solve(p, a @ p)
    x = g.standard_normal((n, d))
    y = x @ a
    mod = np.abs(lams)
    for method in METHODS:
        got = spectrum(torch.from_numpy(x), torch.from_numpy(y), method, rank=d)
        # float64 paths: 1e-8.  The float32 range finder sees the data rounded to float32, a relative
        # perturbation ~ eps32 of K; Bauer-Fike bounds the eigenvalue error by kappa(eigenvectors of A)
        # times that (kappa ~ 400 here; measured error 2e-5): we allow 10 x eps32 x kappa x |lambda|max.
        tol = 1e-8 if method != "randomized" else 10 * EPS32 * np.linalg.cond(np.linalg.eig(a)[1]) * 1.5
        assert match_error(got.eigenvalues.numpy(), lams) < tol, method
        assert got.fit_r2 == pytest.approx(1.0, abs=tol / 100)
        assert got.near_unit_mass == float(np.mean(np.abs(mod - 1) <= 0.05))
        assert got.outside_mass == float(np.mean(mod > 1.05))
        assert got.spectral_radius == pytest.approx(1.5, abs=tol)


def _pydmd_eigs(x_cols: np.ndarray, y_cols: np.ndarray, r: int) -> np.ndarray:
    from pydmd import DMD

    dmd = DMD(svd_rank=r, exact=True)
    dmd.fit(x_cols, y_cols)
    return np.asarray(dmd.eigs)


@pytest.mark.parametrize("source", ["random", "gpt2"])
def test_pydmd_on_same_snapshots(source):
    """PyDMD models columns, y = A x; our K acts on rows (Zy ~ Zx K), so A = K^T: same eigenvalues."""
    if source == "random":
        g = np.random.default_rng(2)
        x = g.standard_normal((400, 48))
        y = np.tanh(x @ g.standard_normal((48, 48)) / 6) + x
    else:
        snaps = tiny_snapshots("gpt2")
        x, y = snaps.inputs[1].double().numpy(), snaps.outputs[1].double().numpy()
    got = block_spectrum(torch.from_numpy(x), torch.from_numpy(y), rank=256, method="exact")
    r = got.rank_used
    w = whiten(torch.from_numpy(x), 256, method="exact")
    zx = w.apply(torch.from_numpy(x)).numpy()
    yt = torch.from_numpy(y)
    zy = w.apply(yt, mean=yt.mean(0)).numpy()
    ours = got.eigenvalues.numpy()
    # (a) PyDMD on our whitened snapshots, no truncation
    err_whitened = match_error(_pydmd_eigs(zx.T, zy.T, r), ours)
    # (b) PyDMD on the centered raw snapshots, its own SVD truncated at the same rank
    err_raw = match_error(_pydmd_eigs((x - x.mean(0)).T, (y - y.mean(0)).T, r), ours)
    scale = max(1.0, np.abs(ours).max())
    # both sides are float64 SVD/eig of the same data: 1e-8 covers cond <= 1e6 in the whitening
    assert err_whitened < 1e-8 * scale
    assert err_raw < 1e-8 * scale


def test_invariances():
    g = np.random.default_rng(3)
    n, d = 300, 24
    x = g.standard_normal((n, d))
    y = x @ (g.standard_normal((d, d)) / 4) + 0.1 * g.standard_normal((n, d))
    base = block_spectrum(torch.from_numpy(x), torch.from_numpy(y), rank=d).eigenvalues.numpy()
    m = g.standard_normal((d, d)) + 3 * np.eye(d)  # invertible
    moved = block_spectrum(torch.from_numpy(x @ m), torch.from_numpy(y @ m), rank=d).eigenvalues.numpy()
    assert match_error(moved, base) < 1e-9 * max(1, np.abs(base).max())
    shifted = block_spectrum(torch.from_numpy(x + 7.0), torch.from_numpy(y - 3.0), rank=d).eigenvalues.numpy()
    assert match_error(shifted, base) < 1e-10 * max(1, np.abs(base).max())
    f32 = block_spectrum(torch.from_numpy(x).float(), torch.from_numpy(y).float(), rank=d).eigenvalues.numpy()
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    ref32 = block_spectrum(torch.from_numpy(x32), torch.from_numpy(y32), rank=d).eigenvalues.numpy()
    assert match_error(f32, ref32) == 0.0  # float32 input is cast to float64 before any arithmetic


def test_spectral_features_by_hand():
    delta = 0.05
    lam = torch.tensor([1.0, 0.95, 1.05, 0.9, 1.1, 2.0, 0.5j, -1.0], dtype=torch.complex128)
    f = spectral_features(lam, delta)
    # band is inclusive: | |lam| - 1 | <= delta; 0.95 and 1.05 land on the edges up to rounding
    mod = lam.abs().numpy()
    assert f["near_unit_mass"] == float(np.mean(np.abs(mod - 1) <= delta))
    assert f["near_unit_mass"] in (2 / 8, 3 / 8, 4 / 8)  # 1, -1 and possibly the two edge values
    assert f["spectral_radius"] == 2.0
    assert f["outside_mass"] == float(np.mean(mod > 1 + delta))
    assert 2 / 8 <= f["outside_mass"] <= 3 / 8
    clear = spectral_features(torch.tensor([1.0, 0.9, 1.2, 0.3j], dtype=torch.complex128), delta)
    assert clear == {"near_unit_mass": 0.25, "spectral_radius": 1.2, "outside_mass": 0.25}


def test_auto_whitening_is_randomized_only_for_wide_data():
    from hf_rksp.spectral import resolve_method

    assert resolve_method("auto", 2048, 4096, 256) == "randomized"  # LLaMA-7B width
    assert resolve_method("auto", 512, 4096, 256) == "gram"  # N - 1 = 511 < 4 r
    assert resolve_method("auto", 2048, 576, 256) == "gram"  # SmolLM2
    assert resolve_method("exact", 2048, 4096, 256) == "exact"


def test_randomized_whitening_is_orthonormal_and_reuses_its_projection():
    """Zx = Xc V S^-1 has orthonormal columns (to float32 rounding) and the cached Zx equals apply(x)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 120, generator=g) * torch.logspace(0, -2, 120)
    w = whiten(x, 16, method="randomized", generator=g)
    assert w.method == "randomized" and w.rank == 16 and w.z is not None
    eye = torch.eye(16, dtype=torch.float64)
    assert torch.allclose(w.z.T @ w.z, eye, atol=1e-5)  # float32 data: ~eps32 * cond
    assert torch.allclose(w.apply(x), w.z, atol=1e-5)
    assert torch.allclose(w.basis.T @ w.basis, eye, atol=1e-6)


def test_range_finder_iterates_until_converged_and_falls_back_on_flat_spectra():
    """The predicted subspace error (s_k/s_r)^(2q+2) decides how many iterations run, not the minimum."""
    from hf_rksp.spectral import MAX_POWER_ITERS, RANGE_TOL

    g = np.random.default_rng(3)
    n, d, r = 1200, 400, 40
    # slowly decaying spectrum: s_40 / s_60 = 1.05, far from converged after 2 iterations
    x = g.standard_normal((n, d)) @ np.diag(np.linspace(1.0, 0.2, d)) @ np.linalg.qr(g.standard_normal((d, d)))[0]
    y = x @ (np.eye(d) + 0.3 * g.standard_normal((d, d)) / np.sqrt(d))
    ref = reference(x, y, rank=r, delta=0.05)
    got = block_spectrum(torch.from_numpy(x), torch.from_numpy(y), rank=r, method="randomized", niter=2,
                         generator=torch.Generator().manual_seed(0))
    w = got.whitening
    assert w.method == "randomized" and 2 < w.power_iters <= MAX_POWER_ITERS and w.error_estimate <= RANGE_TOL
    # converged (28 iterations): eigenvalue error 3e-4; stopped at the 2 asked for it would be 0.056
    assert match_error(got.eigenvalues.numpy(), ref["eigenvalues"]) < 5e-3
    # with the default minimum (6 > PROBE_ITERS) a Chebyshev filter does it in fewer products with G (10)
    cheb = block_spectrum(torch.from_numpy(x), torch.from_numpy(y), rank=r, method="randomized",
                          generator=torch.Generator().manual_seed(0))
    assert cheb.whitening.method == "randomized" and cheb.whitening.error_estimate <= RANGE_TOL
    assert cheb.whitening.power_iters < w.power_iters
    assert match_error(cheb.eigenvalues.numpy(), ref["eigenvalues"]) < 5e-3
    # all singular values equal: no iteration count can separate the top r, so the exact Gram path runs
    flat = np.linalg.qr(g.standard_normal((n, d)))[0] * 3.0
    w = whiten(torch.from_numpy(flat), r, method="randomized", generator=torch.Generator().manual_seed(0))
    assert w.method == "gram" and w.power_iters == 6 and w.error_estimate > RANGE_TOL
