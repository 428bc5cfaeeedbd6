"""What `Conv_Decomposer` and `FC_Decomposer` share, tested once for each: the caller's model, in place, atomicity,
bad input, names, skip reasons, second calls, shared modules, dtypes, attributes and the rank rules.

Each test runs on every `Kind`: the conv decomposer with each of its methods, and the Linear decomposer. A kind
says how to build its layers and models; the tests say what must hold for all of them."""
import copy
import pytest, torch
from torch import nn
import fasterai.decompose.conv as conv_mod
import fasterai.decompose.fc as fc_mod
import fasterai.decompose.factorize as factorize_mod
from fasterai.decompose.all import *
from fasterai.decompose.ranks import full_ranks
from helpers import rel, snapshot, same

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


class DoubledConv(nn.Conv2d):
    def forward(self, x): return super().forward(x) * 2


class Scaled(nn.Linear):
    def forward(self, x): return super().forward(x) * 3


class Kind:
    "One decomposer, and for the conv decomposer one method: how to call it and what to build for it."
    def __init__(self, name, dec, block, kw=None, cut=None):
        self.name, self.dec, self.block, self.kw = name, dec, block, kw or {}
        self.cut = {} if cut is None else dict(percent_removed=cut)   # the decomposers' default cut unless given
        self.conv = dec is Conv_Decomposer
        self.method = self.kw.get('method')

    def __repr__(self): return self.name

    def decompose(self, model, dec=None, **kw):
        "Decompose `model` with this kind's method and cut (`kw` wins), quietly; the result and the decomposer."
        dec = dec or self.dec()
        return dec.decompose(model, **{**self.kw, **self.cut, 'verbose': False, **kw}), dec

    def full_rank(self, layer):
        "`layer` decomposed at full rank (a block that is bigger than the layer)."
        return self.decompose(layer, percent_removed=0, allow_growth=True)

    def layer(self, i, o, **kw):
        "A layer of this kind from `i` to `o` channels or features."
        return nn.Conv2d(i, o, 3, **kw) if self.conv else nn.Linear(i, o, **kw)

    def nested(self):
        "Two levels of Sequential, four (conv) or three (Linear) layers, named 0.0, 0.2, 1.0, 1.2 or 0, 2.0, 2.2."
        if not self.conv:
            return nn.Sequential(nn.Linear(20, 48), nn.ReLU(),
                                 nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10)))
        return nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)),
            nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)))

    def nested_input(self): return torch.randn(1, 3, 8, 8) if self.conv else torch.randn(3, 20)


CONV = [Kind(f'conv-{m}', Conv_Decomposer, LowRankConv, dict(method=m, **(dict(cp_iter=5) if m == 'cp' else {})))
        for m in ('tucker', 'svd', 'spatial', 'cp')]
FC = Kind('fc', FC_Decomposer, LowRankLinear, cut=0.75)
KINDS = CONV + [FC]
EXACT = [k for k in CONV if k.method != 'cp'] + [FC]             # exact at full rank, and with spectral rank rules


# ----------------------------------------------------------------------------------------------------------
# The caller's model, in place, atomicity
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS, ids=repr)
def test_caller_model_unchanged(kind):
    torch.manual_seed(0)
    model = kind.nested().eval()
    snap = snapshot(model)
    x = kind.nested_input()
    y = model(x)
    out, _ = kind.decompose(model, input_shape=tuple(x.shape))
    n_blocks = sum(isinstance(m, kind.block) for m in out.modules())
    assert out is not model and (n_blocks >= 1 if kind.conv else n_blocks == 3)
    assert same(model, snap)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), y)


@pytest.mark.parametrize('kind', [CONV[0], FC], ids=repr)
def test_inplace_changes_and_returns_model(kind):
    torch.manual_seed(0)
    model = kind.nested()
    ref = copy.deepcopy(model)
    out, _ = kind.decompose(model, inplace=True)
    assert out is model
    blocks = [model[0][2], model[1][0]] if kind.conv else [model[0], model[2][0], model[2][2]]
    assert all(isinstance(b, kind.block) for b in blocks)
    assert n_params(model) < n_params(ref)
    x = kind.nested_input()
    assert model(x).shape == ref(x).shape


SEAMS = {'conv-tucker': [(conv_mod, 'factorize_conv'), (factorize_mod, 'tucker2')], 'fc': [(fc_mod, 'lowrank')]}

@pytest.mark.parametrize('kind, mod, target', [(k, m, t) for k in (CONV[0], FC) for m, t in SEAMS[k.name]],
                         ids=lambda v: v if isinstance(v, str) else repr(v) if isinstance(v, Kind) else '')
def test_failure_half_way_leaves_model_as_before(monkeypatch, kind, mod, target):
    torch.manual_seed(0)
    model = kind.nested()
    snap = snapshot(model)
    real, calls = getattr(mod, target), []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('boom on the 2nd layer')
        return real(*a, **k)

    monkeypatch.setattr(mod, target, flaky)
    with pytest.raises(RuntimeError, match='boom'): kind.decompose(model, inplace=True)
    assert len(calls) == 2
    assert same(model, snap)
    assert not any(isinstance(m, LowRankBlock) for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# Bad input and names
# ----------------------------------------------------------------------------------------------------------

BAD_COMMON = [
    (dict(percent_removed=-0.1), 'percent_removed'), (dict(percent_removed=1.0), 'percent_removed'),
    (dict(percent_removed=1.5), 'percent_removed'), (dict(percent_removed=float('nan')), 'percent_removed'),
    (dict(percent_removed='a'), 'percent_removed'), (dict(energy_threshold=0), 'energy_threshold'),
    (dict(energy_threshold=1.5), 'energy_threshold'), (dict(calibration=2), 'calibration'),
    (dict(ranks=[4]), 'ranks'), (dict(ranks={'nope': 4}), 'ranks'),
]
BAD_CONV = BAD_COMMON + [
    (dict(energy_threshold=float('nan')), 'energy_threshold'), (dict(method='tuker'), 'method'),
    (dict(method=None), 'method'), (dict(n_iter=0), 'n_iter'), (dict(n_iter=1.5), 'n_iter'), (dict(tol=0), 'tol'),
    (dict(tol=-1e-3), 'tol'), (dict(calibration=-1.5), 'calibration'), (dict(rank='evbmf'), 'rank'),
    (dict(ranks={'1': 0}), 'ranks'), (dict(ranks={'1': -3}), 'ranks'), (dict(ranks={'1': 'a'}), 'ranks'),
    (dict(ranks={'1': 2.5}), 'ranks'), (dict(ranks={'1': (2, 3, 4)}), 'ranks'), (dict(ranks={1: 4}), 'ranks'),
    (dict(method='cp', energy_threshold=0.9), 'energy_threshold'), (dict(inplace='yes'), 'inplace'),
    (dict(input_shape=(1, 3, -4, 8)), 'input_shape'),
]
BAD_FC = BAD_COMMON + [
    (dict(rank='svd'), 'rank'), (dict(ranks={'0': 0}), 'ranks'), (dict(ranks={'0': -1}), 'ranks'),
    (dict(ranks={'0': 'a'}), 'ranks'), (dict(ranks={'0': 2.5}), 'ranks'), (dict(ranks={'0': (2, 3)}), 'ranks'),
    (dict(ranks={'0': True}), 'ranks'), (dict(layers=[0]), 'layers'), (dict(inplace=1), 'inplace'),
    (dict(input_shape='big'), 'input_shape'),
]
BAD = [(CONV[0], kw, name) for kw, name in BAD_CONV] + [(FC, kw, name) for kw, name in BAD_FC]

@pytest.mark.parametrize('kind, kw, name', BAD, ids=lambda v: repr(v) if isinstance(v, (dict, Kind)) else None)
def test_bad_input(kind, kw, name):
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3)) if kind.conv else kind.nested()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError)) as e:
        kind.dec().decompose(model, verbose=False, **kw)
    assert name in str(e.value), str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


NOT_MODULES = [None, 3, 1.5, 'model', [nn.Conv2d(1, 1, 3)], {'a': nn.Linear(2, 2)}, torch.zeros(3)]

@pytest.mark.parametrize('kind', [CONV[0], FC], ids=repr)
@pytest.mark.parametrize('bad', NOT_MODULES, ids=lambda b: type(b).__name__)
def test_non_module_model(kind, bad):
    with pytest.raises(TypeError, match='model'):
        kind.dec().decompose(bad, verbose=False)


@pytest.mark.parametrize('kind, arg', [(CONV[0], 'layers'), (CONV[0], 'exclude'), (FC, 'layers'), (FC, 'exclude'),
                                       (FC, 'ranks')], ids=lambda v: v if isinstance(v, str) else repr(v))
def test_missing_names_listed(kind, arg):
    missing, close = ('1.3', '1.2') if kind.conv else ('2.3', '2.2')
    with pytest.raises(ValueError, match=arg) as e:
        kind.dec().decompose(kind.nested(), verbose=False, **{arg: {missing: 4} if arg == 'ranks' else [missing]})
    assert f"'{missing}'" in str(e.value) and 'close names' in str(e.value) and f"'{close}'" in str(e.value)


@pytest.mark.parametrize('kind', [CONV[0], FC], ids=repr)
def test_layers_subtree_and_exclude(kind):
    torch.manual_seed(0)
    model = kind.nested()
    x = kind.nested_input()
    base = type(model[1][0]) if kind.conv else nn.Linear
    if kind.conv:
        out, dec = kind.decompose(model, layers=['1'])
        assert set(dec.report.name) == {'1.0', '1.2'}
        assert type(out[0][0]) is base and type(out[0][2]) is base
        assert isinstance(out[1][0], kind.block) and isinstance(out[1][2], kind.block)
        out, dec = kind.decompose(model, layers='0.2')
        assert list(dec.report.name) == ['0.2'] and isinstance(out[0][2], kind.block)
        out, dec = kind.decompose(model, exclude=['1', '0.0'])
        assert list(dec.report.name) == ['0.2']
        assert type(out[1][0]) is base and type(out[0][0]) is base
    else:
        out, dec = kind.decompose(model, percent_removed=0.8, layers=['2'])
        assert list(dec.report.name) == ['2.0', '2.2']
        assert type(out[0]) is base and isinstance(out[2][0], kind.block) and isinstance(out[2][2], kind.block)
        out, dec = kind.decompose(model, percent_removed=0.8, exclude='2.0')
        assert list(dec.report.name) == ['0', '2.2'] and type(out[2][0]) is base
    assert out(x).shape == model(x).shape


# ----------------------------------------------------------------------------------------------------------
# Layers left alone, blocks made once
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', KINDS, ids=repr)
def test_subclass_overriding_forward_skipped(kind):
    torch.manual_seed(0)
    sub = DoubledConv(6, 16, 3) if kind.conv else Scaled(20, 40)
    model = nn.Sequential(sub, kind.layer(16, 16) if kind.conv else nn.Linear(40, 10))
    x = torch.randn(1, 6, 9, 9) if kind.conv else torch.randn(2, 20)
    out, dec = kind.decompose(model, **(dict(percent_removed=0.5, allow_growth=True) if kind.conv else {}))
    rows = dec.report.set_index('name')
    assert rows.loc['0'].status == 'skipped' and 'overrides forward' in rows.loc['0'].reason
    assert type(out[0]) is type(sub) and rows.loc['1'].status == 'decomposed'
    assert out(x).shape == model(x).shape


@pytest.mark.parametrize('kind', KINDS, ids=repr)
def test_nan_inf_weights_skipped(kind):
    torch.manual_seed(0)
    if kind.conv: model = nn.Sequential(nn.Conv2d(6, 16, 3), nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3))
    else: model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 40), nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight.view(-1)[0] = float('nan')
        model[1].weight.view(-1)[57] = float('inf') if kind.conv else -float('inf')
    out, dec = kind.decompose(model, **(dict(percent_removed=0.5, allow_growth=True) if kind.conv else
                                       dict(percent_removed=0.8)))
    rep = dec.report.set_index('name')
    for n in ('0', '1'):
        assert rep.loc[n].status == 'skipped' and 'NaN' in rep.loc[n].reason, rep.loc[n].reason
        assert type(out[int(n)]) is type(model[int(n)])
    assert rep.loc['2'].status == 'decomposed'
    assert all(torch.isfinite(p).all() for p in out[2].parameters())
    # the skipped layers are left exactly as they were: no new NaN anywhere
    sd, sd0 = out.state_dict(), model.state_dict()
    for k in ('0.weight', '1.weight', '0.bias', '1.bias'):
        torch.testing.assert_close(sd[k], sd0[k], equal_nan=True, rtol=0, atol=0)
    assert sum(torch.isnan(p).sum().item() for p in out.parameters()) == 1


@pytest.mark.parametrize('kind', KINDS, ids=repr)
def test_second_call_does_not_redecompose(kind):
    torch.manual_seed(0)
    if kind.conv:
        model = nn.Sequential(nn.Conv2d(6, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.Flatten(), nn.Linear(32 * 25, 10))
        x, kw, n = torch.randn(2, 6, 9, 9), dict(percent_removed=0.3, allow_growth=True), 2
    else: model, x, kw, n = kind.nested(), torch.randn(2, 20), {}, 3
    once, dec = kind.decompose(model, **kw)
    assert (dec.report.status == 'decomposed').sum() == n
    blocks = [m for m in once.modules() if isinstance(m, kind.block)]
    twice, dec2 = kind.decompose(once, **kw)
    assert n_params(twice) == n_params(once)
    assert len(dec2.report) == n
    assert (dec2.report.status == 'skipped').all() and (dec2.report.reason == 'already decomposed').all()
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    torch.testing.assert_close(twice(x), once(x))
    again, dec3 = kind.decompose(blocks[0])                           # a block given as the model itself
    assert n_params(again) == n_params(blocks[0])
    assert (dec3.report.status == 'skipped').all() and (dec3.report.reason == 'already decomposed').all()
    other = FC_Decomposer() if kind.conv else Conv_Decomposer()       # nor does the other decomposer touch them
    assert n_params(other.decompose(once, verbose=False)) <= n_params(once)
    if not kind.conv: assert n_params(Conv_Decomposer().decompose(once, verbose=False)) == n_params(once)


@pytest.mark.parametrize('kind', [CONV[0], FC], ids=repr)
def test_same_module_twice_decomposed_once(kind):
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, 3, padding=1) if kind.conv else nn.Linear(32, 32)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    for inplace in (False, True):
        m = copy.deepcopy(model) if inplace else model
        out, dec = kind.decompose(m, inplace=inplace)
        assert len(dec.report) == 1 and dec.report.status[0] == 'decomposed'
        assert isinstance(out[0], kind.block) and out[0] is out[2]
        if inplace: assert out is m
    assert model[0] is model[2] and type(model[0]) is type(layer)


# ----------------------------------------------------------------------------------------------------------
# dtypes and attributes
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', EXACT, ids=repr)
def test_float64_stays_float64_and_exact(kind):
    g = torch.Generator().manual_seed(0)
    if kind.conv:
        layer = nn.Conv2d(6, 8, (3, 5), stride=(2, 1), padding=(1, 2), padding_mode='reflect', dtype=torch.float64)
        x = torch.randn(2, 6, 11, 13, generator=g, dtype=torch.float64)
    else:
        layer = nn.Linear(40, 30, dtype=torch.float64)
        x = None
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=torch.float64))
    if x is None: x = torch.randn(4, 40, generator=g, dtype=torch.float64)
    blk, dec = kind.full_rank(layer)
    assert dec.report.status[0] == 'decomposed'
    assert all(p.dtype == torch.float64 for p in blk.parameters())
    y = blk(x)
    assert y.dtype == torch.float64
    err = rel(y, layer(x))
    assert err <= 1e-10, f'{kind}: float64 full-rank error {err:.2e} (float32-level precision lost)'


@pytest.mark.parametrize('kind', EXACT, ids=repr)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_preserved(dtype, kind):
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 8, 3, padding=1) if kind.conv else nn.Linear(40, 30)
    layer = copy.deepcopy(ref).to(dtype)
    x = torch.randn(2, 6, 9, 9) if kind.conv else torch.randn(4, 40)
    blk, dec = kind.full_rank(layer)
    assert dec.report.status[0] == 'decomposed', dec.report.reason[0]
    assert all(p.dtype == dtype for p in blk.parameters())
    y = blk(x.to(dtype))
    assert y.dtype == dtype
    assert rel(y.float(), ref(x)) <= 1e-2


@pytest.mark.parametrize('kind', KINDS, ids=repr)
def test_attributes_carry_over(kind):
    torch.manual_seed(0)
    if kind.conv:
        model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3, dtype=torch.float64))
        kw = dict(percent_removed=0.5, allow_growth=True)
    else:
        model = nn.Sequential(nn.Linear(20, 48), nn.Linear(48, 64), nn.Linear(64, 10, dtype=torch.float64),
                              nn.Linear(64, 64, dtype=torch.bfloat16))
        kw = dict(percent_removed=0.8)
    model.train()
    model[0].requires_grad_(False)
    model[1].eval()
    out, dec = kind.decompose(model, **kw)
    assert (dec.report.status == 'decomposed').all(), dec.report.reason
    for blk, orig in zip(out, model):
        assert isinstance(blk, kind.block)
        for p in blk.parameters():
            assert p.dtype == orig.weight.dtype and p.device == orig.weight.device
            assert p.requires_grad == orig.weight.requires_grad
        assert all(m.training == orig.training for m in blk.modules())
        assert (blk[-1].bias is not None) == (orig.bias is not None)
    assert out.training
    # the caller's model keeps its flags
    assert not model[0].weight.requires_grad and not model[1].training and model[2].training


# ----------------------------------------------------------------------------------------------------------
# Rank rules
# ----------------------------------------------------------------------------------------------------------

def low_rank(kind, seed=0):
    "A layer whose weight is rank 4 (conv 24×16×3×3) or 6 (Linear 60×80) plus a little noise, in a Sequential."
    g = torch.Generator().manual_seed(seed)
    if kind.conv:
        conv = nn.Conv2d(16, 24, 3)
        W = (torch.randn(24, 4, generator=g) @ torch.randn(4, 16 * 9, generator=g)).reshape(24, 16, 3, 3)
        with torch.no_grad(): conv.weight.copy_(W + 0.05 * torch.randn(W.shape, generator=g))
        return nn.Sequential(conv)
    lin = nn.Linear(80, 60)
    W = torch.randn(60, 6, generator=g) @ torch.randn(6, 80, generator=g) + 0.1 * torch.randn(60, 80, generator=g)
    with torch.no_grad(): lin.weight.copy_(W)
    return nn.Sequential(lin)


def full(kind, layer): return tuple(full_ranks(layer, kind.method)) if kind.conv else (min(layer.weight.shape),)


@pytest.mark.parametrize('kind', EXACT, ids=repr)
def test_energy_threshold_monotone(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3)) if kind.conv else nn.Sequential(nn.Linear(50, 40))
    prev = None
    for e in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
        _, dec = kind.decompose(model, energy_threshold=e, allow_growth=True)
        r = tuple(dec.report.ranks[0])
        assert all(1 <= v <= f for v, f in zip(r, full(kind, model[0])))
        if prev is not None: assert all(a >= b for a, b in zip(r, prev)), (e, r, prev)
        prev = r
    assert prev == full(kind, model[0])


@pytest.mark.parametrize('kind', EXACT, ids=repr)
def test_vbmf_calibration(kind):
    model = low_rank(kind)
    x = torch.randn(1, 16, 6, 6) if kind.conv else torch.randn(2, 80)
    ranks = {}
    for c in (-1, -0.5, 0, 0.5, 1):
        out, dec = kind.decompose(model, rank='vbmf', calibration=c, allow_growth=True)
        row = dec.report.iloc[0]
        assert row.status == 'decomposed', row.reason
        ranks[c] = tuple(row.ranks)
        assert all(v >= 1 for v in ranks[c])
        assert torch.isfinite(out(x)).all()
    cs = sorted(ranks)
    assert all(all(a <= b for a, b in zip(ranks[c1], ranks[c2])) for c1, c2 in zip(cs, cs[1:])), ranks
    assert ranks[1] == full(kind, model[0]) and ranks[0] != ranks[1]
    if kind.method == 'svd': assert ranks[0] == (4,)
    if not kind.conv: assert ranks[0] == (6,) and ranks[-1] == (1,)
