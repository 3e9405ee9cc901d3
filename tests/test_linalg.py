"""hf_rksp/spectral/linalg.py against numpy in float64 (an independent reference written here).

Tolerances: the 2-norm by Lanczos stops when its residual bound is below 1e-12 relative, so 1e-10 relative
against numpy's SVD leaves room for rounding; the real basis is exact algebra, checked to 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_rksp.spectral.linalg import complex_inverse, condition, real_basis, real_inverse, spectral_norm, unit_columns


@pytest.mark.parametrize("shape", [(7, 7), (40, 25), (25, 40), (1, 5)])
def test_spectral_norm_is_the_largest_singular_value(shape):
    rng = np.random.default_rng(sum(shape))
    a = rng.standard_normal(shape) * np.logspace(0, 3, shape[1])[None, :]
    want = np.linalg.svd(a, compute_uv=False)[0]
    assert spectral_norm(torch.from_numpy(a)) == pytest.approx(want, rel=1e-10)
    c = a + 1j * rng.standard_normal(shape)
    assert spectral_norm(torch.from_numpy(c)) == pytest.approx(np.linalg.svd(c, compute_uv=False)[0], rel=1e-10)


def test_real_basis_of_a_real_operators_eigenvectors():
    """V = Wr U with U unitary: ||V||_2 = ||Wr||_2, V^-1 rebuilt from Wr^-1, and back."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 12))
    lam, vec = torch.linalg.eig(torch.from_numpy(a))
    v = unit_columns(vec)
    basis = real_basis(v)
    assert basis is not None
    wr, jp, jq, jr = basis
    assert wr.dtype == torch.float64 and jp.numel() > 0  # a random real matrix has complex pairs
    vn = v.numpy()
    assert np.linalg.norm(wr.numpy(), 2) == pytest.approx(np.linalg.norm(vn, 2), rel=1e-12)
    wr_inv = torch.linalg.inv(wr)
    v_inv = complex_inverse(wr_inv, jp, jq, jr).numpy()
    np.testing.assert_allclose(v_inv @ vn, np.eye(12), atol=1e-10)
    np.testing.assert_allclose(real_inverse(torch.from_numpy(v_inv), jp, jq, jr).numpy(), wr_inv.numpy(), atol=1e-10)
    assert condition(wr, wr_inv) == pytest.approx(np.linalg.cond(vn, 2), rel=1e-9)


def test_no_real_basis_for_unpaired_complex_columns():
    v = torch.tensor([[1 + 1j, 0], [0, 1 + 0j]], dtype=torch.complex128)
    assert real_basis(v) is None
