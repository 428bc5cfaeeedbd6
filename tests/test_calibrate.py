"Calibration: batches from every data kind, exact im2col patches, second moments, hooks and modes, whitened low rank / channel SVD / Tucker-2."
import math, warnings
import pytest, torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from fasterai.decompose.factorize import *
from fasterai.decompose.whiten import *
from fasterai.decompose.batches import *
from fasterai.decompose.stats import *
from fasterai.decompose.sensitivity import *
from helpers import rel

F64 = torch.float64


# ---------------------------------------------------------------- batches
def test_iter_batches_tensor_and_limits():
    x = torch.randn(70, 3)
    items = list(iter_batches(x))
    assert [k for k, _ in items] == ['args'] * 3 and [v[0].shape[0] for _, v in items] == [32, 32, 6]
    assert torch.equal(torch.cat([v[0] for _, v in items]), x)
    assert len(list(iter_batches(x, n_batches=2))) == 2 and list(iter_batches(x, n_batches=0)) == []
    with pytest.raises(ValueError): list(iter_batches(x, n_batches=-1))

def test_iter_batches_torch_dataloader_dicts_and_lists():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10))
    dl = torch.utils.data.DataLoader(ds, batch_size=4)
    items = list(iter_batches(dl))
    assert [v[0].shape for _, v in items] == [(4, 4), (4, 4), (2, 4)] and all(len(v) == 1 for _, v in items)
    enc = [{'input_ids': torch.ones(2, 5, dtype=torch.long), 'attention_mask': torch.ones(2, 5)}]
    assert next(iter_batches(enc))[0] == 'kwargs'
    assert next(iter_batches([[torch.ones(2, 3), torch.zeros(2)]]))[1][0].shape == (2, 3)
    assert next(iter_batches([(enc[0], torch.zeros(2))]))[0] == 'kwargs'           # (encodings, labels)

def test_iter_batches_fastai():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader as FDL
    ds = [(torch.full((3,), float(i)), i) for i in range(20)]
    train, valid = FDL(ds, bs=8), FDL(ds[:4], bs=2)
    dls = DataLoaders(train, valid)
    items = list(iter_batches(dls))
    assert len(items) == 3 and items[0][1][0].shape == (8, 3)                     # the train loader, inputs only
    assert len(list(iter_batches(train, n_batches=1))) == 1

def test_run_model_kwargs_and_device():
    class KW(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(5, 2)
        def forward(self, input_ids, attention_mask): return self.lin(input_ids.float() * attention_mask)
    m = KW()
    item = next(iter_batches([{'input_ids': torch.ones(2, 5, dtype=torch.long), 'attention_mask': torch.ones(2, 5)}]))
    assert run_model(m, item).shape == (2, 2) and run_model(m, item, torch.device('cpu')).shape == (2, 2)

# ---------------------------------------------------------------- patches
def patch_rows(conv, x):
    P = conv_patches(conv, x)
    g, T = conv.groups, conv.out_channels
    return torch.einsum('gtd,ngd->ngt', conv.weight.reshape(g, T // g, -1), P.reshape(len(P), g, -1)).reshape(len(P), T)

def conv_rows(conv, x): return conv(x).movedim(1, -1).reshape(-1, conv.out_channels)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_patches_reproduce_conv(data):
    "W.reshape(T, -1) @ patch is the conv output, for any dims, stride, dilation, padding form and mode."
    n = data.draw(st.integers(1, 3))
    g = data.draw(st.sampled_from([1, 2]))
    S, T = g * data.draw(st.integers(1, 3)), g * data.draw(st.integers(1, 3))
    k = tuple(data.draw(st.integers(1, 4)) for _ in range(n))
    dil = tuple(data.draw(st.integers(1, 2)) for _ in range(n))
    mode = data.draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
    pad = data.draw(st.sampled_from(['int', 'tuple', 'same', 'valid']))
    stride = tuple(data.draw(st.integers(1, 3)) for _ in range(n)) if pad != 'same' else 1
    padding = dict(int=1, same='same', valid='valid').get(pad) or tuple(data.draw(st.integers(0, 2)) for _ in range(n))
    size = tuple(data.draw(st.integers(max(3, d * (kk - 1) + 1), 8)) for d, kk in zip(dil, k))
    cls = [nn.Conv1d, nn.Conv2d, nn.Conv3d][n - 1]
    conv = cls(S, T, k, stride=stride, padding=padding, dilation=dil, groups=g, bias=False, padding_mode=mode).double()
    x = torch.randn(2, S, *size, dtype=F64)
    try: ref = conv_rows(conv, x)
    except RuntimeError: assume(False)                                           # a combination torch refuses
    assert torch.allclose(patch_rows(conv, x), ref, atol=1e-12)

def test_supports_stats():
    assert supports_stats(nn.Linear(2, 3)) and supports_stats(nn.Conv3d(2, 3, 1))
    assert not supports_stats(nn.Conv2d(4, 4, 3, groups=2)) and supports_stats(nn.Conv2d(4, 4, 3, groups=2), grouped=True)
    assert not supports_stats(nn.ConvTranspose2d(2, 2, 3)) and not supports_stats(nn.ReLU())

# ---------------------------------------------------------------- statistics
def test_linear_stats_over_leading_dims_and_chunking():
    lin = nn.Linear(6, 3)
    x = torch.randn(4, 5, 7, 6) + 2.
    a, b = InputStats(), InputStats(); b.chunk_elems = 13
    a.add(lin, x); b.add(lin, x)
    X = x.reshape(-1, 6).double()
    assert a.n == b.n == 140
    assert torch.allclose(a.sigma, X.T @ X / 140, rtol=1e-5) and torch.allclose(b.sigma, a.sigma, rtol=1e-5)
    with pytest.raises(ValueError): InputStats().sigma

def test_grouped_conv_stats_per_group():
    conv = nn.Conv1d(6, 9, 3, padding=1, groups=3).double()
    x = torch.randn(5, 6, 11, dtype=F64)
    s = InputStats(3); s.chunk_elems = 1; s.add(conv, x)
    P = conv_patches(conv, x)
    full = P.T @ P / len(P)
    assert s.sigma.shape == (3, 6, 6) and s.n == 55                              # d = S/g·k = 2·3
    for j in range(3): assert torch.allclose(s.sigma[j], full[6 * j:6 * (j + 1), 6 * j:6 * (j + 1)], atol=1e-12)

def make_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
                        nn.Conv2d(6, 6, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    net.train(); net[3].eval()
    return net

def test_collect_stats_leaves_model_untouched():
    net = make_net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    x = torch.randn(20, 3, 7, 7)
    mods = {'0': net[0], '4': net[4], '7': net[7]}
    stats = collect_stats(net, x, mods, n_batches=None)
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in sd.items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert stats['0'].n == 20 * 49 and stats['4'].n == 20 * 25 and stats['7'].n == 20
    assert stats['4'].sigma.shape == (2, 27, 27)
    # the Linear's Σ is the second moment of what it really received (eval-mode BN, no dropout)
    net.eval()
    with torch.no_grad(): feats = net[:7](x).double()
    assert torch.allclose(stats['7'].sigma, feats.T @ feats / 20, rtol=1e-4, atol=1e-7)

def test_collect_stats_restores_on_error_and_rejects_bad_modules():
    class Boom(nn.Module):
        def forward(self, x): raise RuntimeError('boom')
    net = nn.Sequential(nn.Linear(3, 3), Boom()).train()
    with pytest.raises(RuntimeError, match='boom'): collect_stats(net, torch.randn(4, 3), {'0': net[0]})
    assert net.training and net[0].training and not net[0]._forward_pre_hooks
    with pytest.raises(TypeError): collect_stats(net, torch.randn(4, 3), {'1': nn.ReLU()})

def test_collect_stats_stop_early_and_kwargs_models():
    net = make_net()
    s = collect_stats(net, torch.randn(40, 3, 5, 5), {'0': net[0]}, n_batches=2, stop_early=True)
    assert s['0'].n == 40 * 25
    class KW(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(5, 2)
        def forward(self, input_ids, attention_mask): return self.lin(input_ids.float() * attention_mask)
    m = KW()
    data = [{'input_ids': torch.ones(3, 4, 5, dtype=torch.long), 'attention_mask': torch.ones(3, 4, 5)}] * 2
    s = collect_stats(m, data, {'lin': m.lin})
    assert s['lin'].n == 24 and torch.allclose(s['lin'].sigma, torch.ones(5, 5, dtype=F64))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = collect_stats(m, [], {'lin': m.lin})
    assert s['lin'].n == 0 and any('no inputs' in str(x.message) for x in w)

# ---------------------------------------------------------------- whitening
def test_whitening_paths():
    Z = torch.randn(30, 5, dtype=F64) @ torch.randn(5, 12, dtype=F64)
    sig = Z.T @ Z / 30
    L = whitening(sig)
    lam = 1e-6 * sig.trace() / 12
    assert torch.equal(L, L.tril()) and torch.allclose(L @ L.T, sig + lam * torch.eye(12, dtype=F64), atol=1e-10)
    neg = sig - 1e-9 * torch.eye(12, dtype=F64)                                   # indefinite: Cholesky must fail
    L0 = whitening(neg, ridge=0)
    assert torch.isfinite(L0).all() and torch.allclose(L0 @ L0.T, sig, atol=1e-7)
    B = torch.randn(4, 12, dtype=F64)
    assert torch.allclose(unwhiten(B, L0) @ L0, B, atol=1e-6) and torch.allclose(unwhiten(B, L) @ L, B, atol=1e-8)
    assert torch.equal(whitening(torch.zeros(3, 3)), torch.eye(3, dtype=F64))
    with pytest.raises(ValueError): whitening(torch.full((3, 3), float('nan')))

# ---------------------------------------------------------------- whitened low rank
def random_sigma(n, rank, seed, samples=None):
    g = torch.Generator().manual_seed(seed)
    X = (torch.randn(samples or 4 * n, rank, generator=g, dtype=F64) * torch.logspace(0, -2, rank, dtype=F64)) @ torch.randn(rank, n, generator=g, dtype=F64)
    X = X + 0.3 * torch.randn(n, generator=g, dtype=F64)                         # a mean, kept inside Σ
    return X, X.T @ X / len(X)

@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 24), n=st.integers(1, 24), rank_frac=st.floats(0.1, 1.0), r_frac=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_whitened_lowrank_error_is_predicted(m, n, rank_frac, r_frac, seed):
    "E‖(M − AB)x‖² over the samples equals the discarded whitened energy; never worse than plain SVD; exact at full rank."
    X, sig = random_sigma(n, max(1, round(rank_frac * n)), seed)
    M = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    r = round(r_frac * min(m, n))
    A, B, s = whitened_lowrank(M, sig, r)
    assert A.shape == (m, r) and B.shape == (r, n) and len(s) == min(m, n) and torch.isfinite(A).all() and torch.isfinite(B).all()
    meas = (X @ (M - A @ B).T).pow(2).sum(1).mean()
    pred = s[r:].pow(2).sum()
    total = s.pow(2).sum()
    assert abs(float(meas - pred)) <= 1e-3 * float(pred) + 1e-5 * float(total)   # the ridge on a rank-deficient Σ costs ~1e-6 of the total
    Ap, Bp, _ = lowrank(M, r)
    assert output_error(M, A @ B, sig) <= output_error(M, Ap @ Bp, sig) + 1e-6
    Af, Bf, _ = whitened_lowrank(M, sig, min(m, n))
    assert torch.allclose(Af @ Bf, M, atol=1e-7 * float(M.abs().max()))

def test_whitened_lowrank_matches_measurement_within_1pct():
    X, sig = random_sigma(64, 12, 0, samples=3000)
    M = torch.randn(40, 64, dtype=F64)
    for MM, XX, SS in ((M, X, sig), (M[:, :20].T.contiguous(), X[:, :40], sig[:40, :40])):  # wide and tall
        A, B, s = whitened_lowrank(MM, SS, 6)
        meas = float((XX @ (MM - A @ B).T).pow(2).sum(1).mean().sqrt())
        pred = float(s[6:].pow(2).sum().sqrt())
        assert abs(meas - pred) <= 0.01 * pred, (meas, pred)
        assert abs(output_error(MM, A @ B, SS) - predicted_error(s, 6)) <= 0.01 * predicted_error(s, 6)
    with pytest.raises(ValueError): whitened_lowrank(M, sig[:10, :10], 3)

# ---------------------------------------------------------------- channel SVD
@pytest.mark.parametrize('groups', [1, 3])
def test_whitened_channel_svd_real_outputs(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, (3, 2), padding=1, groups=groups, bias=False).double().requires_grad_(False)
    x = torch.randn(12, 6, 9, 9, dtype=F64)
    x = x + 1.5 * x[:, :1] + 0.2
    stats = collect_stats(conv, x, {'c': conv}, n_batches=None)['c']
    r = 2
    first, second, sv = whitened_channel_svd(conv.weight, stats.sigma, r, groups=groups)
    f0, s0, _ = channel_svd(conv.weight, r, groups=groups)
    assert first.shape == f0.shape and second.shape == s0.shape and len(sv) == groups
    y = conv(x)
    yh = F.conv2d(F.conv2d(x, first, padding=1, groups=groups), second, groups=groups)
    e = rel(yh, y)
    assert abs(e - predicted_error(sv, r)) <= 0.01 * e
    Wh = torch.cat([torch.einsum('tr,rd->td', b.reshape(9 // groups, r), a.reshape(r, -1))
                    for a, b in zip(first.reshape(groups, r, -1), second.reshape(groups, 9 // groups, r))])
    assert abs(output_error(conv.weight, Wh, stats.sigma) - e) <= 1e-6
    yp = F.conv2d(F.conv2d(x, f0.double(), padding=1, groups=groups), s0.double(), groups=groups)
    assert e < rel(yp, y)
    full = min(9 // groups, 6 // groups * 6)                                      # min(T/g, S/g·∏k)
    first, second, _ = whitened_channel_svd(conv.weight, stats.sigma, full, groups=groups)
    assert torch.allclose(F.conv2d(F.conv2d(x, first, padding=1, groups=groups), second, groups=groups), y, atol=1e-8)

# ---------------------------------------------------------------- Tucker-2
def maps(n, S, seed, iso=False, size=10):
    g = torch.Generator().manual_seed(seed)
    if iso: return torch.randn(n, S, size, size, generator=g, dtype=F64)
    mg = torch.Generator().manual_seed(7)
    M1, M2 = torch.randn(S, 3, generator=mg, dtype=F64), torch.randn(S, 3, generator=mg, dtype=F64)
    smooth = F.avg_pool2d(torch.randn(n, 3, size, size, generator=g, dtype=F64), 5, 1, 2) * 3
    rough = torch.randn(n, 3, size, size, generator=g, dtype=F64)
    return (torch.einsum('cl,nlhw->nchw', M1, smooth) + torch.einsum('cl,nlhw->nchw', M2, rough)
            + 0.05 * torch.randn(n, S, size, size, generator=g, dtype=F64) + 0.3)

def heldout(conv, W_hat, x):
    y = F.conv2d(x, conv.weight, padding=1)
    return rel(F.conv2d(x, W_hat, padding=1), y)

def calibrated_conv(iso):
    "A 24→20 3×3 conv, its patch statistics on (an)isotropic maps, and held-out maps."
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 20, 3, padding=1, bias=False).double().requires_grad_(False)
    stats = collect_stats(conv, maps(48, 24, 0, iso), {'c': conv}, n_batches=None)['c']
    return conv, stats, maps(48, 24, 1, iso)

@pytest.mark.parametrize('iso', [False, True])
def test_whitened_tucker_beats_weight_only_heldout(iso):
    conv, stats, test = calibrated_conv(iso)
    ro, ri = 12, 6
    core, Uo, Ui, info = whitened_tucker2(conv.weight, stats.sigma, ro, ri)
    c0, o0, i0, _ = tucker2(conv.weight, ro, ri)
    assert core.shape == (ro, ri, 3, 3) == c0.shape and Uo.shape == o0.shape and Ui.shape == i0.shape
    Ww, Wp = tucker2_weight(core, Uo, Ui), tucker2_weight(c0.double(), o0.double(), i0.double())
    ew, ep = heldout(conv, Ww, test), heldout(conv, Wp, test)
    # on the calibration statistics: the predicted error is the real one, and never above weight-only
    assert abs(output_error(conv.weight, Ww, stats.sigma) - info['error']) <= 1e-6
    assert info['error'] <= output_error(conv.weight, Wp, stats.sigma) + 1e-9
    assert info['error'] <= min(info['errors']) + 1e-12
    if iso: assert ew <= 1.02 * ep, (ew, ep)
    else: assert ew < 0.6 * ep, (ew, ep)

def test_whitened_tucker_exact_and_edge_cases():
    torch.manual_seed(0)
    W = torch.randn(10, 7, 3, 1, dtype=F64)
    conv = nn.Conv2d(7, 10, (3, 1)).double()
    sig = collect_stats(conv, maps(6, 7, 3, size=6), {'c': conv}, n_batches=None)['c'].sigma
    core, Uo, Ui, info = whitened_tucker2(W, sig, 10, 7)
    assert torch.allclose(tucker2_weight(core, Uo, Ui), W, atol=1e-9)
    core, Uo, Ui, info = whitened_tucker2(W, sig, 4, 7)                            # full input rank: one exact step
    assert info['iterations'] == 1 and torch.allclose(Uo.T @ Uo, torch.eye(4, dtype=F64), atol=1e-10)
    core, Uo, Ui, info = whitened_tucker2(W.float(), torch.zeros(21, 21), 3, 2)     # no signal: weight-only
    c0, o0, i0, _ = tucker2(W.float(), 3, 2)
    assert torch.allclose(tucker2_weight(core, Uo, Ui).float(), tucker2_weight(c0, o0, i0), atol=1e-5)
    with pytest.raises(NotImplementedError): whitened_tucker2(W, sig, 3, 2, groups=2)
    with pytest.raises(ValueError): whitened_tucker2(W, sig, 11, 2)
    W3 = torch.randn(5, 4, 2, 2, 2, dtype=F64)                                      # 3-d kernels too
    c3 = nn.Conv3d(4, 5, 2).double()
    s3 = collect_stats(c3, torch.randn(3, 4, 5, 5, 5, dtype=F64), {'c': c3}, n_batches=None)['c'].sigma
    core, Uo, Ui, _ = whitened_tucker2(W3, s3, 5, 4)
    assert core.shape == (5, 4, 2, 2, 2) and torch.allclose(tucker2_weight(core, Uo, Ui), W3, atol=1e-9)

def test_output_error_grouped():
    W = torch.randn(6, 2, 3, dtype=F64)
    sig = torch.stack([torch.eye(6, dtype=F64), 4 * torch.eye(6, dtype=F64)])
    Wh = W.clone(); Wh[3:] = 0                                                     # drop group 2 entirely
    expect = math.sqrt(4 * W[3:].pow(2).sum() / (W[:3].pow(2).sum() + 4 * W[3:].pow(2).sum()))
    assert abs(output_error(W, Wh, sig) - expect) < 1e-12

# ---------------------------------------------------------------- whitened spatial SVD
def _sp(V, H): return torch.einsum('rsi,trj->tsij', V[..., 0], H[:, :, 0])

@pytest.mark.parametrize('iso', [False, True])
def test_whitened_spatial_beats_weight_only_heldout(iso):
    conv, stats, test = calibrated_conv(iso)
    V, H, err = whitened_spatial(conv.weight, stats.sigma, 10)
    assert V.shape == (10, 24, 3, 1) and H.shape == (20, 10, 1, 3)
    v0, h0, _ = spatial_svd(conv.weight.double(), 10)
    Ww, Wp = _sp(V, H), _sp(v0, h0)
    assert abs(output_error(conv.weight, Ww, stats.sigma) - err) <= 1e-6          # the reported error is the real one
    assert err <= output_error(conv.weight, Wp, stats.sigma) + 1e-9               # never above weight-only on Σ
    ew, ep = heldout(conv, Ww, test), heldout(conv, Wp, test)
    if iso: assert ew <= 1.05 * ep, (ew, ep)
    else: assert ew < 0.7 * ep, (ew, ep)

def test_whitened_spatial_full_rank_output_weighting_and_edges():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, (3, 2), bias=False).double()
    sig = collect_stats(conv, maps(6, 5, 3, size=7), {'c': conv}, n_batches=None)['c'].sigma
    W = conv.weight.detach()
    V, H, err = whitened_spatial(W, sig, min(5 * 3, 7 * 2))
    assert torch.allclose(_sp(V, H), W, atol=1e-9) and err < 1e-7
    G = torch.randn(7, 7, dtype=F64); G = G @ G.T
    P = output_root(G)
    V, H, err = whitened_spatial(W, sig, 6, out_root=P)                            # error in the ‖P·‖ norm
    Wh = _sp(V, H)
    assert abs(output_error(apply_rows(P[0], W), apply_rows(P[0], Wh), sig) - err) <= 1e-6
    V0, H0, _ = whitened_spatial(W, torch.zeros_like(sig), 6)                      # no signal: still finite factors
    assert torch.isfinite(V0).all() and torch.isfinite(H0).all()
    with pytest.raises(ValueError, match='rank'): whitened_spatial(W, sig, 15)
    with pytest.raises(ValueError, match='sigma'): whitened_spatial(W, sig[:5, :5], 3)
