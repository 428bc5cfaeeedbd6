"Full-rank exactness of every block, on odd shapes; skip reasons; bad input; the caller's model untouched."
import copy, math
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fasterai.decompose.all import *
from fasterai.decompose.factorize import tucker2, tucker2_weight
from helpers import rel


def full(layer, method, **kw):
    return Conv_Decomposer().decompose(layer, percent_removed=0, method=method, allow_growth=True, verbose=False, **kw)

CASES = [
    dict(cls=nn.Conv2d, S=3, T=16, k=7, stride=2, padding=3),
    dict(cls=nn.Conv2d, S=1, T=8, k=3, padding='same'),
    dict(cls=nn.Conv2d, S=8, T=1, k=5, padding='valid', bias=False),
    dict(cls=nn.Conv2d, S=6, T=10, k=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1), padding_mode='circular'),
    dict(cls=nn.Conv2d, S=6, T=4, k=4, padding='same', padding_mode='reflect'),
    dict(cls=nn.Conv2d, S=4, T=12, k=(2, 3), padding=1, padding_mode='replicate'),
    dict(cls=nn.Conv2d, S=8, T=8, k=3, padding=1, groups=4),
    dict(cls=nn.Conv1d, S=5, T=7, k=5, stride=2, padding=2, padding_mode='reflect'),
    dict(cls=nn.Conv3d, S=3, T=6, k=3, stride=(1, 2, 2), padding=1),
]

def make(c):
    c = dict(c); cls, S, T, k = c.pop('cls'), c.pop('S'), c.pop('T'), c.pop('k')
    return cls(S, T, k, **c)

def inp(conv, n=13):
    return torch.randn(2, conv.in_channels, *([n] * len(conv.kernel_size)))

@pytest.mark.parametrize('case', CASES, ids=lambda c: f"{c['cls'].__name__}-{c.get('k')}-{c.get('padding_mode', 'zeros')}")
@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial'])
def test_full_rank_exact(case, method):
    conv = make(case)
    dec = Conv_Decomposer()
    blk = dec.decompose(conv, percent_removed=0, method=method, allow_growth=True, verbose=False)
    row = dec.report.iloc[0]
    if row.status == 'skipped':
        assert method == 'spatial' and (len(conv.kernel_size) != 2 or 1 in conv.kernel_size), row.reason
        assert blk is not conv and isinstance(blk, type(conv))
        return
    assert isinstance(blk, LowRankConv)
    x = inp(conv)
    assert rel(blk(x), conv(x)) < 1e-5

@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(dim=st.sampled_from([1, 2, 3]), S=st.integers(1, 6), T=st.integers(1, 6), g=st.sampled_from([1, 2]),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 2), sw=st.integers(1, 3), d=st.integers(1, 2),
       pad=st.sampled_from(['int', 'tuple', 'same', 'valid']), mode=st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']),
       bias=st.booleans(), method=st.sampled_from(['tucker', 'svd', 'spatial']))
def test_property_full_rank_exact(dim, S, T, g, kh, kw, sh, sw, d, pad, mode, bias, method):
    S, T = S * g, T * g
    k = (kh, kw, 2)[:dim] if dim > 1 else (kh,)
    stride = (sh, sw, 1)[:dim] if pad != 'same' else 1
    padding = {'int': 1, 'tuple': tuple(min(x // 2 + 1, 2) for x in k), 'same': 'same', 'valid': 'valid'}[pad]
    cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dim - 1]
    conv = cls(S, T, k, stride=stride, padding=padding, dilation=d, groups=g, bias=bias, padding_mode=mode)
    x = torch.randn(2, S, *([9] * dim))
    try: ref = conv(x)
    except RuntimeError: return                                  # configuration torch itself rejects
    dec = Conv_Decomposer()
    blk = dec.decompose(conv, percent_removed=0, method=method, allow_growth=True, verbose=False)
    row = dec.report.iloc[0]
    if row.status == 'skipped':
        assert row.reason, row
        return
    assert rel(blk(x), ref) < 1e-5, (row.ranks, row.reason)

@pytest.mark.parametrize('dtype', [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_kept(dtype):
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    blk = full(conv, 'tucker')
    assert all(p.dtype == dtype for p in blk.parameters())
    x = torch.randn(2, 8, 10, 10, dtype=dtype)
    if dtype == torch.float64: assert rel(blk(x), conv(x)) < 1e-10
    else: assert rel(blk.float()(x.float()), conv.float()(x.float())) < 2e-2

def test_cp_reaches_rank_and_improves():
    m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    errs = []
    for r in (2, 8, 24):
        dec = Conv_Decomposer()
        out = dec.decompose(m, method='cp', ranks={'0': r}, allow_growth=True, verbose=False)
        assert out[0].ranks == (r,)
        assert all(torch.isfinite(p).all() for p in out.parameters())
        errs.append(dec.report.weight_error.iloc[0])
    assert errs[0] > errs[1] > errs[2]

class Custom(nn.Conv2d):
    def forward(self, x): return super().forward(x).relu()

def test_skip_reasons():
    shared = nn.Conv2d(16, 16, 3, padding=1)
    m = nn.Sequential(Custom(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1),
                      nn.utils.parametrizations.weight_norm(nn.Conv2d(16, 16, 3, padding=1)),
                      nn.ConvTranspose2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    m[5].weight = m[4].weight
    nanconv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad(): nanconv.weight[0, 0, 0, 0] = float('nan')
    m.append(nanconv)
    dec = Conv_Decomposer()
    out = dec.decompose(m, verbose=False)
    reasons = dict(zip(dec.report.name, dec.report.reason))
    assert 'overrides forward' in reasons['0']
    assert '1×1' in reasons['1']
    assert 'parametrized' in reasons['2']
    assert 'ConvTranspose' in reasons['3']
    assert 'shared' in reasons['4'] and 'shared' in reasons['5']
    assert 'NaN' in reasons['6']
    assert (dec.report.status == 'skipped').all()

def test_mha_out_proj_left_alone_and_model_runs():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True)
    model = nn.Sequential(nn.Linear(16, 32), layer)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.8, verbose=False)
    r = dict(zip(dec.report.name, dec.report.reason))
    assert 'reads' in r['1.self_attn.out_proj']
    assert out(torch.randn(2, 5, 16)).shape == (2, 5, 32)

def test_caller_model_unchanged_and_inplace():
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    sd = copy.deepcopy(m.state_dict())
    out = Conv_Decomposer().decompose(m, verbose=False)
    assert out is not m and isinstance(m[0], nn.Conv2d)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    out2 = Conv_Decomposer().decompose(m, inplace=True, verbose=False)
    assert out2 is m and isinstance(m[0], LowRankConv)

def test_failure_half_way_loses_nothing(monkeypatch):
    import fasterai.decompose.conv as C
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    sd = copy.deepcopy(m.state_dict())
    calls = []
    orig = C.factorize_conv
    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('boom')
        return orig(*a, **k)
    monkeypatch.setattr(C, 'factorize_conv', boom)
    with pytest.raises(RuntimeError): Conv_Decomposer().decompose(m, inplace=True, verbose=False)
    assert isinstance(m[0], nn.Conv2d) and isinstance(m[2], nn.Conv2d)
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())

def test_second_call_does_not_redecompose():
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
    once = Conv_Decomposer().decompose(m, verbose=False)
    dec = Conv_Decomposer()
    twice = dec.decompose(once, verbose=False)
    assert n_params(twice) == n_params(once)
    assert (dec.report.reason == 'already decomposed').all()

def test_carry_over_grad_mode_device():
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
    m[0].weight.requires_grad_(False); m[0].bias.requires_grad_(False)
    m[1].eval()
    out = Conv_Decomposer().decompose(m, verbose=False)
    assert not any(p.requires_grad for p in out[0].parameters())
    assert all(p.requires_grad for p in out[1].parameters())
    assert out[0].training and not out[1].training and not any(l.training for l in out[1])

def test_module_under_two_names():
    c = nn.Conv2d(16, 16, 3, padding=1)
    m = nn.Sequential(c, nn.ReLU(), c)
    dec = Conv_Decomposer()
    out = dec.decompose(m, verbose=False)
    assert len(dec.report) == 1 and out[0] is out[2] and isinstance(out[0], LowRankConv)

def test_layers_exclude_and_ranks():
    m = nn.Sequential(nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3)), nn.Conv2d(32, 32, 3))
    dec = Conv_Decomposer()
    out = dec.decompose(m, layers=['0'], exclude=['0.1'], verbose=False)
    assert isinstance(out[0][0], LowRankConv) and isinstance(out[0][1], nn.Conv2d) and isinstance(out[1], nn.Conv2d)
    with pytest.raises(ValueError, match='close names'): Conv_Decomposer().decompose(m, layers=['0.2'])
    out = Conv_Decomposer().decompose(m, ranks={'1': (8, 4)}, layers=['1'], verbose=False)
    assert out[1].ranks == (8, 4)
    out = Conv_Decomposer().decompose(m, ranks={'1': 10_000}, layers=['1'], allow_growth=True, verbose=False)
    assert out[1].ranks == (32, 32)                            # capped at what the layer holds

@pytest.mark.parametrize('kw,word', [(dict(percent_removed=1.0), 'percent_removed'), (dict(percent_removed=-0.1), 'percent_removed'),
                                     (dict(percent_removed=float('nan')), 'percent_removed'), (dict(percent_removed='a'), 'percent_removed'),
                                     (dict(energy_threshold=0), 'energy_threshold'), (dict(energy_threshold=1.5), 'energy_threshold'),
                                     (dict(method='tuker'), 'method'), (dict(n_iter=0), 'n_iter'), (dict(tol=0), 'tol'),
                                     (dict(calibration=2), 'calibration'), (dict(rank='evbmf'), 'rank'),
                                     (dict(ranks={'0': 0}), 'ranks'), (dict(ranks={'nope': 3}), 'ranks')])
def test_bad_input(kw, word):
    m = nn.Sequential(nn.Conv2d(16, 16, 3))
    with pytest.raises(ValueError, match=word): Conv_Decomposer().decompose(m, verbose=False, **kw)

def test_not_a_module():
    with pytest.raises(TypeError, match='model'): Conv_Decomposer().decompose('resnet')
    with pytest.raises(TypeError, match='model'): FC_Decomposer().decompose(None)

def test_energy_and_vbmf_ranks():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3)
    r = [Conv_Decomposer().decompose(conv, energy_threshold=e, method='svd', allow_growth=True, verbose=False).ranks[0] for e in (0.5, 0.8, 0.99)]
    assert r[0] <= r[1] <= r[2]
    rv = [Conv_Decomposer().decompose(conv, rank='vbmf', calibration=c, method='svd', allow_growth=True, verbose=False).ranks[0] for c in (-1, 0, 1)]
    assert rv[0] == 1 and rv[0] <= rv[1] <= rv[2] and rv[2] == 32

def test_rank_at_least_one():
    m = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Linear(3, 3))
    out = Conv_Decomposer().decompose(m, percent_removed=0.99, allow_growth=True, verbose=False)
    assert min(out[0].ranks) >= 1

def test_fc_square_break_even_and_exact():
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16))
    dec = FC_Decomposer()
    out = dec.decompose(m, verbose=False)
    assert list(dec.report.status) == ['skipped', 'decomposed'] and 'would not reduce' in dec.report.reason[0]
    blk = FC_Decomposer().decompose(nn.Linear(20, 30), percent_removed=0, allow_growth=True, verbose=False)
    lin = nn.Linear(20, 30); lin.load_state_dict({'weight': blk[1].weight @ blk[0].weight, 'bias': blk[1].bias})
    x = torch.randn(3, 4, 20)
    assert rel(blk(x), lin(x)) < 1e-6


# --- the CPU BLAS/LAPACK paths of the Gram and eigh (taken only on large matrices) ---
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('layout', ['C', 'T', 'strided'])
def test_gram_blas_path_matches_matmul(dtype, layout):
    from fasterai.decompose.factorize import gram
    torch.manual_seed(0)
    if layout == 'C': M = torch.randn(1100, 3600, dtype=dtype)
    elif layout == 'T': M = torch.randn(3600, 1100, dtype=dtype).T            # Fortran-ordered view
    else: M = torch.randn(1100, 7200, dtype=dtype)[:, ::2]                     # neither order
    assert M.shape[0] ** 2 * M.shape[1] >= 2 ** 32                        # big enough for ?syrk
    G, ref = gram(M), M @ M.T
    torch.testing.assert_close(G, G.T, rtol=0, atol=0)                     # symmetric, both triangles filled
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert float((G - ref).abs().max() / ref.abs().max()) < tol


def test_sym_eigh_lapack_path_matches_torch():
    from fasterai.decompose.factorize import sym_eigh
    torch.manual_seed(0)
    X = torch.randn(2048, 2100, dtype=torch.float64)
    G = X @ X.T
    w, v = sym_eigh(G.clone())                                            # ≥ 2048: SciPy's syevd
    assert bool((w[:-1] >= w[1:]).all())                                  # descending
    torch.testing.assert_close(w, torch.linalg.eigvalsh(G).flip(0), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close((v * w) @ v.T, G, rtol=1e-9, atol=1e-7)


def test_hooi_stops_on_error_and_reports_it():
    torch.manual_seed(0)
    W = torch.randn(64, 64, 3, 3)                                         # flat spectrum: the subspace keeps turning
    core, Uo, Ui, info = tucker2(W, 32, 32, n_iter=50, tol=1e-4)
    assert info['iterations'] < 50
    err = float((W - tucker2_weight(core, Uo, Ui)).norm() / W.norm())
    assert abs(info['error'] - err) < 1e-5
    core2, Uo2, Ui2, info2 = tucker2(W, 32, 32, n_iter=50, tol=1e-12)      # run longer: only slightly better
    err2 = float((W - tucker2_weight(core2, Uo2, Ui2)).norm() / W.norm())
    assert err2 <= err + 1e-6 and err - err2 < 5e-3
