"Conv_Decomposer: full-rank exactness, skip reasons, break-even, rank rules, attributes, bad input, atomicity."
import copy, math
import pytest, torch
from torch import nn
from torch.nn.utils import parametrize
from hypothesis import given, settings, strategies as st, HealthCheck
from fasterai.decompose.all import *
from fasterai.decompose.factorize import tucker2, tucker2_weight
from fasterai.decompose.blocks import METHOD_LAYERS
from fasterai.decompose.ranks import full_ranks, cp_rank_bound
from helpers import rel

EXACT = ('tucker', 'svd', 'spatial')
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def full_rank(layer, method, dec=None, **kw):
    dec = dec or Conv_Decomposer()
    return dec.decompose(layer, percent_removed=0, method=method, allow_growth=True, verbose=False, **kw), dec


def spatial_ok(conv):
    k = conv.kernel_size
    return len(k) == 2 and 1 not in k


def input_for(conv, batch=2, extra=2, gen=None):
    "A random input large enough for `conv` (its dilated kernel, and reflect padding)."
    n = len(conv.kernel_size)
    dil = conv.dilation
    pad = (0,) * n if isinstance(conv.padding, str) else conv.padding
    size = [max(d * (k - 1) + 1, 2 * p + 1, 5) + extra for d, k, p in zip(dil, conv.kernel_size, pad)]
    return torch.randn(batch, conv.in_channels, *size, generator=gen)


def check_exact(conv, method, tol=1e-5, x=None):
    "Decompose `conv` at full rank with `method`, check it is decomposed and reproduces the layer."
    torch.manual_seed(0)
    x = input_for(conv) if x is None else x
    blk, dec = full_rank(conv, method)
    row = dec.report.iloc[0]
    assert row.status == 'decomposed', (method, conv, row.reason)
    assert isinstance(blk, LowRankConv) and blk.method == method
    with torch.no_grad(): err = rel(blk(x), conv(x))
    assert err <= tol, (method, conv, err)
    return blk, dec


# ----------------------------------------------------------------------------------------------------------
# Full rank reproduces the layer
# ----------------------------------------------------------------------------------------------------------

SHAPES = {
    '3x3': dict(S=6, T=8, k=3, padding=1),
    '5x5': dict(S=5, T=7, k=5, padding=2),
    '7x7-stride2': dict(S=3, T=16, k=7, stride=2, padding=3),
    'nonsquare-3x5': dict(S=6, T=10, k=(3, 5), padding=(1, 2)),
    'nonsquare-5x2': dict(S=4, T=6, k=(5, 2)),
    'even-2x2': dict(S=4, T=6, k=2),
    'even-4x4-same': dict(S=4, T=6, k=4, padding='same'),
    'even-2x4-same-dil': dict(S=4, T=6, k=(2, 4), padding='same', dilation=(2, 1)),
    'stride-aniso': dict(S=6, T=8, k=3, stride=(2, 1), padding=1),
    'stride-aniso-3x1': dict(S=6, T=8, k=(3, 5), stride=(3, 1), padding=(0, 2)),
    'dilation': dict(S=6, T=8, k=3, dilation=2, padding=2),
    'dilation-aniso': dict(S=6, T=8, k=(3, 3), dilation=(1, 3), padding=(1, 3)),
    'pad-int': dict(S=6, T=8, k=3, padding=2),
    'pad-tuple': dict(S=6, T=8, k=3, padding=(0, 2)),
    'pad-same': dict(S=6, T=8, k=5, padding='same'),
    'pad-valid': dict(S=6, T=8, k=3, padding='valid'),
    'no-bias': dict(S=6, T=8, k=3, bias=False),
    'cin1': dict(S=1, T=8, k=3, padding=1),
    'cin3': dict(S=3, T=12, k=3, padding=1),
    'cout1': dict(S=8, T=1, k=3, padding=1),
    'cin1-cout1': dict(S=1, T=1, k=5, padding=2),
    'widening': dict(S=2, T=32, k=3, padding=1),
    'narrowing': dict(S=32, T=2, k=3, padding=1),
}


def make2d(c):
    c = dict(c)
    return nn.Conv2d(c.pop('S'), c.pop('T'), c.pop('k'), **c)


@pytest.mark.parametrize('method', EXACT)
@pytest.mark.parametrize('shape', list(SHAPES))
def test_full_rank_exact_shapes(shape, method):
    torch.manual_seed(0)
    conv = make2d(SHAPES[shape])
    check_exact(conv, method)


@pytest.mark.parametrize('method', EXACT)
@pytest.mark.parametrize('padding_mode', ['zeros', 'reflect', 'replicate', 'circular'])
@pytest.mark.parametrize('padding', [1, (2, 1), 'same', 'valid'], ids=str)
def test_full_rank_exact_padding_modes(padding_mode, padding, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, (3, 5), stride=1 if padding == 'same' else (2, 1), padding=padding,
                     dilation=(1, 2), padding_mode=padding_mode)
    check_exact(conv, method)


def test_1x1_svd_exact_tucker_spatial_skip():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 1, stride=2)
    check_exact(conv, 'svd')
    x = torch.randn(2, 6, 9, 9)
    for method in ('tucker', 'spatial'):
        out, dec = full_rank(conv, method)
        row = dec.report.iloc[0]
        assert row.status == 'skipped' and '1×1' in row.reason, (method, row.reason)
        assert type(out) is nn.Conv2d and torch.equal(out(x), conv(x))


@pytest.mark.parametrize('method', ['tucker', 'spatial'])
def test_1d_kernel_spatial_skip_reason(method):
    "spatial has nothing to separate in a k×1 kernel (it is skipped with a reason); tucker handles it."
    conv = nn.Conv2d(4, 6, (3, 1))
    out, dec = full_rank(conv, method)
    row = dec.report.iloc[0]
    if method == 'spatial': assert row.status == 'skipped' and isinstance(row.reason, str) and row.reason
    else: check_exact(conv, method)


# --- dtypes -------------------------------------------------------------------------------------------------


# --- dimensionality, groups -----------------------------------------------------------------------------------

@pytest.mark.parametrize('method', ['tucker', 'svd'])
@pytest.mark.parametrize('conv', [
    lambda: nn.Conv1d(5, 7, 5, stride=2, padding=2, padding_mode='reflect'),
    lambda: nn.Conv1d(3, 9, 4, padding='same', dilation=2, padding_mode='circular'),
    lambda: nn.Conv3d(3, 6, 3, stride=(1, 2, 2), padding=1),
    lambda: nn.Conv3d(4, 5, (2, 3, 1), padding=(1, 1, 0), dilation=(1, 2, 1), padding_mode='replicate', bias=False),
], ids=['1d-reflect', '1d-circular-same', '3d', '3d-aniso-replicate'])
def test_conv1d_conv3d_exact(conv, method):
    torch.manual_seed(0)
    check_exact(conv(), method)


@pytest.mark.parametrize('dims', [1, 3])
def test_spatial_needs_2d_kernel(dims):
    conv = (nn.Conv1d if dims == 1 else nn.Conv3d)(4, 6, 3)
    out, dec = full_rank(conv, 'spatial')
    row = dec.report.iloc[0]
    assert row.status == 'skipped' and '2-d' in row.reason
    assert type(out) is type(conv)


@pytest.mark.parametrize('method', EXACT)
@pytest.mark.parametrize('groups', [2, 4])
def test_grouped_exact(groups, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, stride=(1, 2), groups=groups, padding_mode='circular')
    blk, _ = check_exact(conv, method)
    assert any(m.groups == groups for m in blk)


@pytest.mark.parametrize('method', EXACT)
def test_depthwise_exact(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    check_exact(conv, method)
    conv = nn.Conv2d(4, 8, 5, padding=2, groups=4, padding_mode='reflect')   # depthwise multiplier 2
    check_exact(conv, method)


@pytest.mark.parametrize('cls', [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial', 'cp'])
def test_conv_transpose_skipped(cls, method):
    torch.manual_seed(0)
    model = nn.Sequential(cls(6, 8, 3), nn.ReLU())
    dec = Conv_Decomposer()
    out = dec.decompose(model, method=method, percent_removed=0.5, allow_growth=True, verbose=False)
    row = dec.report.iloc[0]
    assert row.status == 'skipped' and 'ConvTranspose' in row.reason
    assert type(out[0]) is cls
    x = torch.randn(1, 6, *([5] * (len(model[0].kernel_size))))
    assert torch.equal(out(x), model(x))


# ----------------------------------------------------------------------------------------------------------
# Property test: random convs, full rank is exact
# ----------------------------------------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    n = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 1, 2, 4]))
    cin = groups * draw(st.integers(1, 3 if groups > 1 else 6))
    cout = groups * draw(st.integers(1, 3 if groups > 1 else 6))
    kmax = 3 if n == 3 else 5
    k = tuple(draw(st.integers(1, kmax)) for _ in range(n))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
    mode = draw(st.sampled_from(['zeros', 'reflect', 'replicate', 'circular']))
    pk = draw(st.sampled_from(['int', 'tuple', 'same', 'valid']))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    if pk == 'same': stride, pad = (1,) * n, 'same'
    elif pk == 'valid': pad = 'valid'
    elif pk == 'int': pad = draw(st.integers(0, 2))
    else: pad = tuple(draw(st.integers(0, 2)) for _ in range(n))
    if draw(st.booleans()): stride = stride[0] if len(set(stride)) == 1 else stride    # int stride sometimes
    bias = draw(st.booleans())
    extra = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(n=n, cin=cin, cout=cout, k=k, stride=stride, padding=pad, dilation=dil, groups=groups,
                bias=bias, padding_mode=mode, extra=extra, seed=seed)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cfg=conv_configs())
def test_property_full_rank_exact(cfg):
    cfg = dict(cfg)
    n, extra, seed = cfg.pop('n'), cfg.pop('extra'), cfg.pop('seed')
    g = torch.Generator().manual_seed(seed)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    torch.manual_seed(seed)
    conv = cls(cfg.pop('cin'), cfg.pop('cout'), cfg.pop('k'), **cfg)
    x = input_for(conv, extra=extra, gen=g)
    with torch.no_grad(): y = conv(x)
    methods = ['svd'] + (['tucker'] if math.prod(conv.kernel_size) > 1 else []) + (['spatial'] if spatial_ok(conv) else [])
    for method in methods:
        blk, dec = full_rank(conv, method)
        row = dec.report.iloc[0]
        assert row.status == 'decomposed', (method, conv, row.reason)
        with torch.no_grad(): err = rel(blk(x), y)
        assert err <= 1e-5, (method, conv, tuple(x.shape), err)
    if math.prod(conv.kernel_size) == 1:
        _, dec = full_rank(conv, 'tucker')
        assert dec.report.status[0] == 'skipped' and '1×1' in dec.report.reason[0]


# ----------------------------------------------------------------------------------------------------------
# CP
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('conv', [
    lambda: nn.Conv2d(8, 6, 3, padding=1),
    lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode='circular'),
    lambda: nn.Conv1d(8, 6, 5, padding=2, padding_mode='reflect'),
], ids=['2d', '2d-aniso-circular', '1d-reflect'])
def test_cp_reaches_rank_and_improves(conv):
    torch.manual_seed(0)
    conv = conv()
    model = nn.Sequential(conv)
    x = input_for(conv)
    y = model(x)
    errs, out_errs = [], []
    for r in (1, 2, 4, 8, 16, 32):
        dec = Conv_Decomposer()
        res = dec.decompose(model, method='cp', ranks={'0': r}, allow_growth=True, verbose=False)
        row = dec.report.iloc[0]
        assert row.status == 'decomposed', row.reason
        blk = res[0]
        want = min(r, cp_rank_bound(conv))   # a rank above the tensor-rank bound is capped to it
        assert isinstance(blk, LowRankConv) and blk.method == 'cp' and tuple(blk.ranks) == (want,) and tuple(row.ranks) == (want,)
        assert blk[0].out_channels == want and blk[-1].in_channels == want
        assert all(torch.isfinite(p).all() for p in res.parameters())
        out = res(x)
        assert torch.isfinite(out).all()
        errs.append(float(row.weight_error)); out_errs.append(rel(out, y))
    assert all(math.isfinite(e) for e in errs)
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_cp_skips_grouped_and_1x1_with_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 1))
    dec = Conv_Decomposer()
    dec.decompose(model, method='cp', verbose=False)
    assert list(dec.report.status) == ['skipped', 'skipped']
    assert all(isinstance(r, str) and r for r in dec.report.reason)


# ----------------------------------------------------------------------------------------------------------
# Layers left alone, with the reason
# ----------------------------------------------------------------------------------------------------------


class Identity(nn.Module):
    def forward(self, X): return X


@pytest.mark.parametrize('how', ['register_parametrization', 'weight_norm'])
def test_parametrized_weight_skipped(how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 16, 3), nn.Conv2d(16, 16, 3))
    if how == 'weight_norm': torch.nn.utils.parametrizations.weight_norm(model[0])
    else: parametrize.register_parametrization(model[0], 'weight', Identity())
    x = torch.randn(1, 6, 9, 9)
    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    row = dec.report.set_index('name').loc['0']
    assert row.status == 'skipped' and 'parametrized' in row.reason
    assert parametrize.is_parametrized(out[0])
    assert dec.report.set_index('name').loc['1'].status == 'decomposed'
    assert out(x).shape == model(x).shape


@pytest.mark.parametrize('fn', ['weight_norm', 'spectral_norm'])
@pytest.mark.filterwarnings('ignore::FutureWarning')
def test_old_style_norm_hooks_skipped(fn):
    "core.py documents that layers with old-style weight_norm/spectral_norm hooks are left alone."
    torch.manual_seed(0)
    model = nn.Sequential(getattr(torch.nn.utils, fn)(nn.Conv2d(6, 16, 3)), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(1, 6, 9, 9)
    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    row = dec.report.set_index('name').loc['0']
    assert row.status == 'skipped' and 'hooks' in row.reason
    assert out(x).shape == model(x).shape


def test_shared_weight_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 32, 3))
    model[2].weight = model[0].weight
    x = torch.randn(1, 16, 9, 9)
    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = dec.report.set_index('name')
    for n in ('0', '2'):
        assert rep.loc[n].status == 'skipped' and 'shared' in rep.loc[n].reason
    assert rep.loc['3'].status == 'decomposed'
    assert out[0].weight is out[2].weight
    assert out(x).shape == model(x).shape


def test_alias_names_select_the_shared_module():
    "The second name of a module registered twice is a real name: layers=/exclude=/ranks= accept it."
    torch.manual_seed(0)
    c = nn.Conv2d(16, 16, 3, padding=1)
    model = nn.Sequential(c, nn.ReLU(), c)
    assert model.get_submodule('2') is c
    dec = Conv_Decomposer()
    out = dec.decompose(model, layers=['2'], verbose=False)
    assert len(dec.report) == 1 and dec.report.status[0] == 'decomposed'
    assert isinstance(out[2], LowRankConv) and out[0] is out[2]
    dec = Conv_Decomposer()
    out = dec.decompose(model, ranks={'2': (3, 5)}, allow_growth=True, verbose=False)
    assert tuple(dec.report.ranks[0]) == (3, 5) and out[2].ranks == (3, 5)
    dec = Conv_Decomposer()
    out = dec.decompose(model, exclude=['2'], verbose=False)
    assert type(out[0]) is nn.Conv2d and out[0] is out[2]


class Owner(nn.Module):
    "Reads its child's weight instead of calling it."
    def __init__(self):
        super().__init__()
        self.conv, self.other = nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3)
    def forward(self, x): return self.other(nn.functional.conv2d(x, self.conv.weight, self.conv.bias, padding=1))


def test_owner_reading_weight_skipped():
    torch.manual_seed(0)
    model = Owner()
    x = torch.randn(1, 16, 9, 9)
    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = dec.report.set_index('name')
    assert rep.loc['conv'].status == 'skipped' and 'reads .conv.weight' in rep.loc['conv'].reason
    assert rep.loc['other'].status == 'decomposed'
    assert type(out.conv) is nn.Conv2d and out(x).shape == model(x).shape


@pytest.mark.filterwarnings('ignore:Lazy modules:UserWarning')
def test_uninitialized_lazy_conv_skipped():
    "core.skip_reason has a 'weight not initialized' reason for lazy layers; they must be left alone, not crash."
    model = nn.Sequential(nn.LazyConv2d(16, 3), nn.Conv2d(16, 32, 3))
    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = dec.report.set_index('name')
    assert rep.loc['0'].status == 'skipped' and 'initialized' in rep.loc['0'].reason
    assert rep.loc['1'].status == 'decomposed'
    assert out(torch.randn(1, 5, 9, 9)).shape == (1, 32, 5, 5)


# ----------------------------------------------------------------------------------------------------------
# Break-even, rank caps
# ----------------------------------------------------------------------------------------------------------

# a layer that every rank cut of `method` at percent_removed=0.2 makes bigger, and one it makes smaller
GROWS = {'tucker': (3, 64), 'svd': (3, 64), 'spatial': (16, 16)}


@pytest.mark.parametrize('method', EXACT)
def test_break_even_params(method):
    S, T = GROWS[method]
    model = nn.Sequential(nn.Conv2d(S, T, 3), nn.Conv2d(T, 64, 3, stride=1), nn.Conv2d(64, 64, 3))
    dec = Conv_Decomposer()
    out = dec.decompose(model, method=method, percent_removed=0.2, verbose=False)
    rep = dec.report
    for row in rep.itertuples():
        i = int(row.name)
        skel = METHOD_LAYERS[method](model[i], *row.ranks, device='meta')
        if row.status == 'skipped':
            assert 'would not reduce' in row.reason and type(out[i]) is nn.Conv2d, row.reason
            assert n_params(skel) >= n_params(model[i]) or 'MACs' in row.reason
        else:
            assert n_params(out[i]) < n_params(model[i]) and n_params(out[i]) == n_params(skel)
    assert rep.status[0] == 'skipped' and 'params' in rep.reason[0], rep.reason[0]
    if method != 'spatial': assert rep.status[2] == 'decomposed'     # 64→64 at 20% off shrinks (spatial needs a deeper cut)
    dec = Conv_Decomposer()
    out = dec.decompose(model, method=method, percent_removed=0.2, allow_growth=True, verbose=False)
    assert (dec.report.status == 'decomposed').all()
    assert isinstance(out[0], LowRankConv) and n_params(out[0]) >= n_params(model[0])


def test_break_even_macs():
    "Fewer params but more MACs (Tucker's first 1×1 runs at input resolution before a stride-4 core)."
    model = nn.Sequential(nn.Conv2d(64, 64, 3, stride=4, padding=1))
    for input_shape in (None, (1, 64, 32, 32)):
        dec = Conv_Decomposer()
        out = dec.decompose(model, method='tucker', input_shape=input_shape, verbose=False)
        row = dec.report.iloc[0]
        assert row.status == 'skipped' and 'MACs' in row.reason, row.reason
        assert type(out[0]) is nn.Conv2d
        dec = Conv_Decomposer()
        out = dec.decompose(model, method='tucker', input_shape=input_shape, allow_growth=True, verbose=False)
        assert dec.report.status[0] == 'decomposed' and isinstance(out[0], LowRankConv)
        assert n_params(out[0]) < n_params(model[0])


def test_macs_reported_and_reduced_with_input_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1))
    for method in EXACT:
        dec = Conv_Decomposer()
        dec.decompose(model, method=method, input_shape=(1, 3, 16, 16), verbose=False)
        rep = dec.report
        assert rep.macs_before.notna().all()
        d = rep[rep.status == 'decomposed']
        assert len(d) and (d.macs_after < d.macs_before).all() and (d.params_after < d.params_before).all()


@pytest.mark.parametrize('method', EXACT)
def test_explicit_ranks_capped(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    dec = Conv_Decomposer()
    out = dec.decompose(model, method=method, ranks={'0': 1000}, allow_growth=True, verbose=False)
    row = dec.report.iloc[0]
    full = {'tucker': (3, 2), 'svd': (3,), 'spatial': (6,)}[method]
    assert tuple(row.ranks) == full and tuple(out[0].ranks) == full
    x = torch.randn(1, 2, 7, 7)
    assert rel(out(x), model(x)) <= 1e-5


@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial', 'cp'])
def test_rank_at_least_one(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 1, 3), nn.Conv2d(1, 1, 2))
    dec = Conv_Decomposer()
    out = dec.decompose(model, method=method, percent_removed=0.99, allow_growth=True, verbose=False, cp_iter=5)
    for r in dec.report.itertuples():
        assert r.status == 'decomposed', r.reason
        assert all(isinstance(v, int) and v >= 1 for v in r.ranks), r.ranks
    x = torch.randn(1, 2, 8, 8)
    assert torch.isfinite(out(x)).all()


def test_full_ranks_are_the_caps():
    "percent_removed=0 picks each mode's full rank (never more than the layer can hold)."
    conv = nn.Conv2d(4, 50, 3)
    for method, full in (('tucker', (36, 4)), ('svd', (36,)), ('spatial', (12,))):
        dec = Conv_Decomposer()
        dec.decompose(conv, method=method, percent_removed=0, allow_growth=True, verbose=False)
        assert tuple(dec.report.ranks[0]) == full, (method, dec.report.ranks[0])


# ----------------------------------------------------------------------------------------------------------
# Attributes carried over; selection
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('method', EXACT)
def test_model_is_the_conv(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    dec = Conv_Decomposer()
    out = dec.decompose(conv, method=method, verbose=False)
    assert isinstance(out, LowRankConv) and dec.report.name[0] == ''
    x = torch.randn(1, 8, 7, 7)
    assert out(x).shape == conv(x).shape
    assert type(conv) is nn.Conv2d


def nested():
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# The caller's model; inplace; atomicity
# ----------------------------------------------------------------------------------------------------------

from helpers import snapshot, same


def test_failing_sample_run_leaves_model_as_before():
    torch.manual_seed(0)
    model = nested()
    snap = snapshot(model)
    with pytest.raises(RuntimeError):
        Conv_Decomposer().decompose(model, inplace=True, input_shape=(1, 5, 8, 8), verbose=False)   # wrong channel count
    assert same(model, snap) and not any(m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# Energy threshold, VBMF, HOOI
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('seed', range(6))
def test_hooi_never_worse_than_first_step(seed):
    g = torch.Generator().manual_seed(seed)
    T, S = [int(v) for v in torch.randint(3, 33, (2,), generator=g)]
    k = int(torch.randint(1, 4, (1,), generator=g))
    W = torch.randn(T, S, k, k, generator=g)
    for _ in range(4):
        ro = int(torch.randint(1, T, (1,), generator=g)); ri = int(torch.randint(1, S, (1,), generator=g))
        first = (W - tucker2_weight(*tucker2(W, ro, ri, n_iter=1)[:3])).norm()
        for n_iter in (2, 5, 10, 50):
            err = (W - tucker2_weight(*tucker2(W, ro, ri, n_iter=n_iter, tol=1e-9)[:3])).norm()
            assert err <= first * (1 + 1e-5) + 1e-6, (T, S, k, ro, ri, n_iter, float(err), float(first))
    # through the decomposer, on a layer: the report's error with HOOI ≤ with one step
    conv = nn.Conv2d(S, T, 3)
    with torch.no_grad(): conv.weight.copy_(torch.randn(T, S, 3, 3, generator=g))
    errs = []
    for n_iter in (1, 10):
        dec = Conv_Decomposer()
        dec.decompose(conv, method='tucker', percent_removed=0.6, n_iter=n_iter, allow_growth=True, verbose=False)
        errs.append(float(dec.report.weight_error[0]))
    assert errs[1] <= errs[0] * (1 + 1e-5) + 1e-7, errs


def test_cp_explicit_rank_capped_at_tensor_rank_bound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    dec = Conv_Decomposer()
    out = dec.decompose(model, method='cp', ranks={'0': 10_000}, allow_growth=True, cp_iter=3, verbose=False)
    assert tuple(dec.report.ranks[0]) == (4 * 6 * 3 * 3 // 6,)               # product of all dims but the largest
    assert out[0].ranks == (36,) and out[0][0].out_channels == 36
    x = torch.randn(2, 4, 8, 8)
    assert torch.isfinite(out(x)).all()


@pytest.mark.parametrize('how', ['input_shape', 'data'])
def test_training_mode_model_keeps_bn_stats(how):
    "Probing forward passes (shapes, the final check) must not update BatchNorm statistics, in the copy or the caller's model."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16)).train()
    with torch.no_grad(): model(torch.randn(8, 3, 8, 8) * 3 + 1)          # non-trivial running stats
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(input_shape=(1, 3, 8, 8)) if how == 'input_shape' else dict(data=torch.randn(4, 3, 8, 8), n_batches=1)
    out = Conv_Decomposer().decompose(model, percent_removed=0.5, method='svd', allow_growth=True, verbose=False, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())            # caller untouched
    for k in ('1.running_mean', '1.running_var', '4.running_var', '4.num_batches_tracked'):
        assert torch.equal(out.state_dict()[k], ref[k]), k                                # the result keeps them too
    assert model.training and out.training and out[1].training


def test_budget_keeps_caller_bn_stats():
    from fasterai.decompose.budget import decompose
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).train()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    decompose(model, budget=0.7, budget_on='macs', input_shape=(1, 3, 8, 8), fc=False, verbose=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())
    assert all(m.training for m in model.modules())
