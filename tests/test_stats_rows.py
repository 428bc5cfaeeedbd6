"""Few calibration rows for many inputs: `InputStats` keeps the rows, and the FC path gives from them what the d×d
moment gives."""
import torch
from torch import nn
from fasterai.decompose.stats import InputStats
from fasterai.decompose.whiten import whitened_lowrank, output_error, predicted_error, lowrank_weight_error
from fasterai.decompose.all import FC_Decomposer
from fasterai.testing import env_seed


def test_rows_kept_then_formed():
    g = torch.Generator().manual_seed(env_seed())
    x = torch.randn(40, 100, generator=g)
    st = InputStats()
    for c in x[:30].split(7): st.update(c)
    assert st.root is not None and tuple(st.root.shape) == (30, 100)        # 30 rows ≤ 100/2: kept
    ref = x[:30].double().T @ x[:30].double() / 30
    assert torch.allclose(st.root.T @ st.root, ref, rtol=0, atol=1e-12)
    assert torch.allclose(st.sigma, ref, rtol=0, atol=1e-12) and st.root is None   # asking for Σ forms it
    for c in x[30:].split(7): st.update(c)                                  # and updates go on in place
    assert torch.allclose(st.sigma, x.double().T @ x.double() / 40, rtol=0, atol=1e-12) and st.n == 40
    more = InputStats()
    for c in x.split(20): more.update(c)                                    # 40 rows ≤ 100/2: kept
    assert more.root is not None and torch.allclose(more.sigma, st.sigma, rtol=0, atol=1e-12)


def test_whitened_from_rows_equals_dense():
    g = torch.Generator().manual_seed(env_seed())
    M = torch.randn(24, 80, generator=g).double()
    R = torch.randn(16, 80, generator=g).double() / 4
    S = R.T @ R
    for r in (1, 8, 24):
        A, B, s = whitened_lowrank(M, S, r)
        A2, B2, s2 = whitened_lowrank(M, None, r, root=R)
        assert torch.allclose(s, s2, rtol=1e-9, atol=1e-10 * float(s[0]))        # eigh: absolute error ∝ s[0]²
        assert torch.allclose(A @ B, A2 @ B2, rtol=0, atol=1e-8 * M.abs().max())
        e, e2 = output_error(M, A @ B, S), output_error(M, (A2, B2), None, root=R)
        assert abs(e - e2) <= 1e-7 * max(e, 1e-12) + 1e-12, (r, e, e2)
        assert abs(lowrank_weight_error(M.float(), A, B, rows=5)
                   - float((M - A @ B).norm() / M.norm())) < 1e-6
        assert abs(predicted_error(s, r) - predicted_error(s2, r)) < 1e-9


def test_fc_decomposer_few_rows_matches_many():
    "A Linear of 256 inputs calibrated on 64 rows (kept) gives the factors of the same rows as a formed moment."
    torch.manual_seed(env_seed())
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 32))
    data = [torch.randn(16, 16) for _ in range(4)]
    a = FC_Decomposer().decompose(model, percent_removed=0.5, data=data, layers=['2'], verbose=False)
    old = InputStats.update
    def dense_update(self, rows):                                           # force the d×d path
        old(self, rows); self.sigma
    InputStats.update = dense_update
    try:
        d = FC_Decomposer(); b = d.decompose(model, percent_removed=0.5, data=data, layers=['2'], verbose=False)
    finally: InputStats.update = old
    x = torch.randn(8, 16)
    assert torch.allclose(a(x), b(x), rtol=1e-4, atol=1e-5)
    assert d.report.predicted_error.notna().all()
