"FC_Decomposer: full-rank exactness, skip reasons, break-even, rank rules, attributes, bad input, atomicity."
import copy, math
import pytest, torch
from torch import nn
from torch.nn.utils import parametrize
import fasterai.decompose.fc as fc_mod
from fasterai.decompose.all import *
from helpers import rel





def full_rank(layer, dec=None, **kw):
    dec = dec or FC_Decomposer()
    return dec.decompose(layer, percent_removed=0, allow_growth=True, verbose=False, **kw), dec


def mlp():
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10)))


# ----------------------------------------------------------------------------------------------------------
# Full rank
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('m,n,bias', [(30, 40, True), (40, 30, True), (17, 17, False), (1, 12, True), (12, 1, True),
                                       (1, 1, False), (64, 3, True)])
@pytest.mark.parametrize('xshape', [(5,), (2, 7), (2, 3, 4)], ids=['2d', '3d', '4d'])
def test_full_rank_exact(m, n, bias, xshape):
    torch.manual_seed(0)
    lin = nn.Linear(n, m, bias=bias)
    blk, dec = full_rank(lin)
    assert dec.report.status[0] == 'decomposed', dec.report.reason[0]
    assert isinstance(blk, LowRankLinear) and blk.ranks == (min(m, n),)
    assert blk[0].bias is None and (blk[1].bias is not None) == bias
    x = torch.randn(*xshape, n)
    assert rel(blk(x), lin(x)) <= 1e-5


def test_float64_stays_float64_and_exact():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(40, 30, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 40, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(30, generator=g, dtype=torch.float64))
    x = torch.randn(4, 40, generator=g, dtype=torch.float64)
    blk, dec = full_rank(lin)
    assert all(p.dtype == torch.float64 for p in blk.parameters())
    y = blk(x)
    assert y.dtype == torch.float64
    err = rel(y, lin(x))
    assert err <= 1e-10, f'float64 full-rank error {err:.2e} (float32-level precision lost)'


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_preserved(dtype):
    torch.manual_seed(0)
    ref = nn.Linear(40, 30)
    lin = copy.deepcopy(ref).to(dtype)
    blk, dec = full_rank(lin)
    assert dec.report.status[0] == 'decomposed'
    assert all(p.dtype == dtype for p in blk.parameters())
    x = torch.randn(4, 40)
    y = blk(x.to(dtype))
    assert y.dtype == dtype and rel(y.float(), ref(x)) <= 1e-2


def test_partial_rank_error_is_the_tail():
    "The report's weight error at rank k is the Eckart–Young tail; it shrinks as k grows."
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    s = torch.linalg.svdvals(lin.weight.detach().double())
    prev = math.inf
    for k in (1, 5, 10, 20, 30):
        dec = FC_Decomposer()
        out = dec.decompose(nn.Sequential(lin), ranks={'0': k}, allow_growth=True, verbose=False)
        err = float(dec.report.weight_error[0])
        expect = (s[k:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()
        assert abs(err - expect) <= 1e-4 and err <= prev + 1e-7
        W = out[0][1].weight.double() @ out[0][0].weight.double()
        assert abs(rel(W, lin.weight.detach()) - expect) <= 1e-4
        prev = err


# ----------------------------------------------------------------------------------------------------------
# Left alone, with the reason
# ----------------------------------------------------------------------------------------------------------

class Att(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 5)
    def forward(self, x):
        h = self.inp(x)
        h = self.mha(h, h, h)[0]
        return self.out(h)


@pytest.mark.parametrize('pr', [0.0, 0.5])
def test_mha_out_proj_skipped_model_runs(pr):
    torch.manual_seed(0)
    model = Att().eval()
    x = torch.randn(2, 7, 12)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=pr, allow_growth=True, verbose=False)
    rep = dec.report.set_index('name')
    row = rep.loc['mha.out_proj']
    assert row.status == 'skipped' and 'out_proj' in row.reason and 'MultiheadAttention' in row.reason
    assert type(out.mha.out_proj) is type(model.mha.out_proj)
    assert rep.loc['inp'].status == 'decomposed' and rep.loc['out'].status == 'decomposed'
    with torch.no_grad(): y = out(x)
    assert y.shape == (2, 7, 5) and torch.isfinite(y).all()
    if pr == 0: assert rel(y, model(x)) <= 1e-5


def test_transformer_encoder_runs():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0, allow_growth=True, verbose=False)
    assert (dec.report[dec.report.name.str.endswith('out_proj')].status == 'skipped').all()
    with torch.no_grad(): assert rel(out(x), model(x)) <= 1e-5


class Scaled(nn.Linear):
    def forward(self, x): return super().forward(x) * 3


class Identity(nn.Module):
    def forward(self, X): return X


def test_subclass_overriding_forward_skipped():
    model = nn.Sequential(Scaled(20, 40), nn.Linear(40, 10))
    dec = FC_Decomposer()
    out = dec.decompose(model, verbose=False)
    assert dec.report.status[0] == 'skipped' and 'overrides forward' in dec.report.reason[0]
    assert type(out[0]) is Scaled and dec.report.status[1] == 'decomposed'
    assert out(torch.randn(2, 20)).shape == (2, 10)


@pytest.mark.parametrize('how', ['register_parametrization', 'weight_norm', 'orthogonal'])
def test_parametrized_skipped(how):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 10))
    if how == 'weight_norm': torch.nn.utils.parametrizations.weight_norm(model[0])
    elif how == 'orthogonal': torch.nn.utils.parametrizations.orthogonal(model[0])
    else: parametrize.register_parametrization(model[0], 'weight', Identity())
    x = torch.randn(2, 20)
    dec = FC_Decomposer()
    out = dec.decompose(model, verbose=False)
    assert dec.report.status[0] == 'skipped' and 'parametrized' in dec.report.reason[0]
    assert parametrize.is_parametrized(out[0]) and dec.report.status[1] == 'decomposed'
    assert out(x).shape == (2, 10)


def test_tied_weights_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 40))
    model[2].weight = model[0].weight
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0, allow_growth=True, verbose=False)
    rep = dec.report.set_index('name')
    for n in ('0', '2'):
        assert rep.loc[n].status == 'skipped' and 'shared' in rep.loc[n].reason
    assert rep.loc['3'].status == 'decomposed'
    assert out[0].weight is out[2].weight
    x = torch.randn(3, 16)
    assert rel(out(x), model(x)) <= 1e-5


def test_same_module_twice_decomposed_once():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.75, verbose=False)
    assert len(dec.report) == 1 and dec.report.status[0] == 'decomposed'
    assert isinstance(out[0], LowRankLinear) and out[0] is out[2]
    assert model[0] is model[2] and type(model[0]) is nn.Linear


def test_second_call_does_not_redecompose():
    torch.manual_seed(0)
    model = mlp()
    dec = FC_Decomposer()
    once = dec.decompose(model, percent_removed=0.75, verbose=False)
    assert (dec.report.status == 'decomposed').sum() == 3
    dec2 = FC_Decomposer()
    twice = dec2.decompose(once, percent_removed=0.75, verbose=False)
    assert n_params(twice) == n_params(once)
    assert len(dec2.report) == 3
    assert (dec2.report.status == 'skipped').all() and (dec2.report.reason == 'already decomposed').all()
    x = torch.randn(2, 20)
    torch.testing.assert_close(twice(x), once(x))
    # the conv decomposer does not touch Linear blocks either, and vice versa
    dec3 = Conv_Decomposer()
    conv_after = dec3.decompose(once, verbose=False)
    assert n_params(conv_after) == n_params(once)


@pytest.mark.filterwarnings('ignore:Lazy modules:UserWarning')
def test_uninitialized_lazy_linear_skipped():
    "core.skip_reason has a 'weight not initialized' reason for lazy layers; they must be left alone, not crash."
    model = nn.Sequential(nn.LazyLinear(40), nn.Linear(40, 10))
    dec = FC_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = dec.report.set_index('name')
    assert rep.loc['0'].status == 'skipped' and 'initialized' in rep.loc['0'].reason
    assert rep.loc['1'].status == 'decomposed'
    assert out(torch.randn(2, 7)).shape == (2, 10)


def test_alias_name_selects_the_shared_module():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    dec = FC_Decomposer()
    out = dec.decompose(model, layers='2', ranks={'2': 4}, verbose=False)
    assert len(dec.report) == 1 and dec.report.status[0] == 'decomposed' and out[0].ranks == (4,)
    assert isinstance(out[2], LowRankLinear) and out[0] is out[2]


def test_nan_inf_weights_skipped():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Linear(40, 40), nn.Linear(40, 10))
    with torch.no_grad():
        model[0].weight[0, 0] = float('nan')
        model[1].weight[3, 3] = -float('inf')
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.8, verbose=False)
    rep = dec.report.set_index('name')
    for n in ('0', '1'):
        assert rep.loc[n].status == 'skipped' and 'NaN' in rep.loc[n].reason
        assert type(out[int(n)]) is nn.Linear
    assert rep.loc['2'].status == 'decomposed'
    assert all(torch.isfinite(p).all() for p in out[2].parameters())
    sd, sd0 = out.state_dict(), model.state_dict()
    for k in ('0.weight', '1.weight'):
        torch.testing.assert_close(sd[k], sd0[k], equal_nan=True, rtol=0, atol=0)
    assert sum(torch.isnan(p).sum().item() for p in out.parameters()) == 1


# ----------------------------------------------------------------------------------------------------------
# Break-even, ranks
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('bias', [True, False])
def test_square_linear_at_half_skipped(bias):
    lin = nn.Linear(64, 64, bias=bias)
    dec = FC_Decomposer()
    out = dec.decompose(nn.Sequential(lin), percent_removed=0.5, verbose=False)
    row = dec.report.iloc[0]
    assert row.status == 'skipped' and 'would not reduce params' in row.reason
    assert type(out[0]) is nn.Linear and row.params_after == row.params_before
    dec = FC_Decomposer()
    out = dec.decompose(nn.Sequential(lin), percent_removed=0.5, allow_growth=True, verbose=False)
    assert dec.report.status[0] == 'decomposed' and isinstance(out[0], LowRankLinear)
    assert n_params(out[0]) >= n_params(lin)


def test_break_even_rank():
    "m×n at rank k shrinks only when k(m+n) (+ bias) < mn (+ bias)."
    m, n = 30, 60                                                # break-even rank 20
    for k, shrinks in ((19, True), (20, False), (25, False)):
        dec = FC_Decomposer()
        out = dec.decompose(nn.Sequential(nn.Linear(n, m)), ranks={'0': k}, verbose=False)
        assert (dec.report.status[0] == 'decomposed') == shrinks, (k, dec.report.reason[0])
        if shrinks: assert n_params(out) < n * m + m


def test_ranks_capped_and_at_least_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 1))
    dec = FC_Decomposer()
    out = dec.decompose(model, ranks={'0': 1000, '1': 7, '2': 99}, allow_growth=True, verbose=False)
    assert [tuple(r) for r in dec.report.ranks] == [(3,), (2,), (1,)]
    x = torch.randn(4, 3)
    assert rel(out(x), model(x)) <= 1e-5
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.99, allow_growth=True, verbose=False)
    assert [tuple(r) for r in dec.report.ranks] == [(1,), (1,), (1,)]
    assert (dec.report.status == 'decomposed').all() and torch.isfinite(out(x)).all()


def test_energy_threshold_monotone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40))
    prev = 0
    for e in (0.01, 0.1, 0.3, 0.6, 0.9, 0.99, 1.0):
        dec = FC_Decomposer()
        dec.decompose(model, energy_threshold=e, allow_growth=True, verbose=False)
        k = dec.report.ranks[0][0]
        assert 1 <= k <= 40 and k >= prev, (e, k, prev)
        prev = k
    assert prev == 40


def test_vbmf_calibration():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(80, 60)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(60, 6, generator=g) @ torch.randn(6, 80, generator=g) + 0.1 * torch.randn(60, 80, generator=g))
    model = nn.Sequential(lin)
    ks = {}
    for c in (-1, -0.5, 0, 0.5, 1):
        dec = FC_Decomposer()
        out = dec.decompose(model, rank='vbmf', calibration=c, allow_growth=True, verbose=False)
        assert dec.report.status[0] == 'decomposed'
        ks[c] = dec.report.ranks[0][0]
        assert torch.isfinite(out(torch.randn(2, 80))).all()
    assert ks[0] == 6
    assert ks[-1] == 1 and ks[1] == 60
    assert ks[-1] <= ks[-0.5] <= ks[0] <= ks[0.5] <= ks[1]


# ----------------------------------------------------------------------------------------------------------
# Attributes, selection
# ----------------------------------------------------------------------------------------------------------

def test_attributes_carry_over():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.Linear(48, 64), nn.Linear(64, 10, dtype=torch.float64), nn.Linear(64, 64, dtype=torch.bfloat16))
    model.train()
    model[0].requires_grad_(False)
    model[1].eval()
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.8, verbose=False)
    assert (dec.report.status == 'decomposed').all()
    for blk, orig in zip(out, model):
        assert isinstance(blk, LowRankLinear)
        for p in blk.parameters():
            assert p.dtype == orig.weight.dtype and p.device == orig.weight.device
            assert p.requires_grad == orig.weight.requires_grad
        assert all(m.training == orig.training for m in blk.modules())
    assert not model[0].weight.requires_grad and not model[1].training


def test_model_is_a_linear():
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    dec = FC_Decomposer()
    out = dec.decompose(lin, percent_removed=0.75, verbose=False)
    assert isinstance(out, LowRankLinear) and out.ranks == (8,)
    assert out(torch.randn(2, 40)).shape == (2, 30)
    assert type(lin) is nn.Linear


def test_layers_subtree_and_exclude():
    torch.manual_seed(0)
    model = mlp()
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.8, layers=['2'], verbose=False)
    assert list(dec.report.name) == ['2.0', '2.2']
    assert type(out[0]) is nn.Linear and isinstance(out[2][0], LowRankLinear) and isinstance(out[2][2], LowRankLinear)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.8, exclude='2.0', verbose=False)
    assert list(dec.report.name) == ['0', '2.2'] and type(out[2][0]) is nn.Linear
    assert out(torch.randn(2, 20)).shape == (2, 10)


@pytest.mark.parametrize('arg', ['layers', 'exclude', 'ranks'])
def test_missing_names_listed(arg):
    model = mlp()
    val = {'2.3': 4} if arg == 'ranks' else ['2.3']
    with pytest.raises(ValueError, match=arg) as e:
        FC_Decomposer().decompose(model, verbose=False, **{arg: val})
    assert "'2.3'" in str(e.value) and 'close names' in str(e.value) and "'2.2'" in str(e.value)


def test_input_shape_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 64))
    dec = FC_Decomposer()
    dec.decompose(model, percent_removed=0.75, input_shape=(2, 7, 20), verbose=False)
    rep = dec.report
    assert list(rep.macs_before) == [20 * 48 * 7, 48 * 64 * 7]
    assert (rep.macs_after < rep.macs_before).all()


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

BAD = [
    (dict(percent_removed=-0.1), 'percent_removed'), (dict(percent_removed=1.0), 'percent_removed'),
    (dict(percent_removed=1.5), 'percent_removed'), (dict(percent_removed=float('nan')), 'percent_removed'),
    (dict(percent_removed='a'), 'percent_removed'), (dict(energy_threshold=0), 'energy_threshold'),
    (dict(energy_threshold=1.5), 'energy_threshold'), (dict(calibration=2), 'calibration'),
    (dict(rank='svd'), 'rank'), (dict(ranks=[4]), 'ranks'), (dict(ranks={'nope': 4}), 'ranks'),
    (dict(ranks={'0': 0}), 'ranks'), (dict(ranks={'0': -1}), 'ranks'), (dict(ranks={'0': 'a'}), 'ranks'),
    (dict(ranks={'0': 2.5}), 'ranks'), (dict(ranks={'0': (2, 3)}), 'ranks'), (dict(ranks={'0': True}), 'ranks'),
    (dict(layers=[0]), 'layers'), (dict(inplace=1), 'inplace'), (dict(input_shape='big'), 'input_shape'),
]


@pytest.mark.parametrize('kw,name', BAD, ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_input(kw, name):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError)) as e:
        FC_Decomposer().decompose(model, verbose=False, **kw)
    assert name in str(e.value), str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize('bad', [None, 1.5, 'model', {'a': nn.Linear(2, 2)}], ids=lambda b: type(b).__name__)
def test_non_module_model(bad):
    with pytest.raises(TypeError, match='model'):
        FC_Decomposer().decompose(bad, verbose=False)


# ----------------------------------------------------------------------------------------------------------
# Caller's model, inplace, atomicity
# ----------------------------------------------------------------------------------------------------------

from helpers import snapshot, same


def test_caller_model_unchanged():
    torch.manual_seed(0)
    model = mlp().eval()
    snap = snapshot(model)
    x = torch.randn(3, 20)
    y = model(x)
    out = FC_Decomposer().decompose(model, percent_removed=0.75, input_shape=(3, 20), verbose=False)
    assert out is not model and sum(isinstance(m, LowRankLinear) for m in out.modules()) == 3
    assert same(model, snap)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert torch.equal(model(x), y)


def test_inplace_changes_and_returns_model():
    torch.manual_seed(0)
    model = mlp()
    out = FC_Decomposer().decompose(model, percent_removed=0.75, inplace=True, verbose=False)
    assert out is model
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2][0], LowRankLinear) and isinstance(model[2][2], LowRankLinear)


def test_failure_half_way_leaves_model_as_before(monkeypatch):
    torch.manual_seed(0)
    model = mlp()
    snap = snapshot(model)
    real, calls = fc_mod.lowrank, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('boom on the 2nd layer')
        return real(*a, **k)

    monkeypatch.setattr(fc_mod, 'lowrank', flaky)
    with pytest.raises(RuntimeError, match='boom'):
        FC_Decomposer().decompose(model, percent_removed=0.75, inplace=True, verbose=False)
    assert len(calls) == 2
    assert same(model, snap)
    assert not any(isinstance(m, LowRankBlock) for m in model.modules())


def test_verbose_summary(capsys):
    FC_Decomposer().decompose(mlp(), percent_removed=0.75)
    out = capsys.readouterr().out
    assert 'FC_Decomposer' in out and 'decomposed 3 of 3' in out
