"FC_Decomposer: full-rank exactness, skip reasons, break-even, rank rules, attributes, bad input, atomicity."
import copy, math
import pytest, torch
from torch import nn
from torch.nn.utils import parametrize
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


class Identity(nn.Module):
    def forward(self, X): return X


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


# ----------------------------------------------------------------------------------------------------------
# Attributes, selection
# ----------------------------------------------------------------------------------------------------------


def test_model_is_a_linear():
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    dec = FC_Decomposer()
    out = dec.decompose(lin, percent_removed=0.75, verbose=False)
    assert isinstance(out, LowRankLinear) and out.ranks == (8,)
    assert out(torch.randn(2, 40)).shape == (2, 30)
    assert type(lin) is nn.Linear


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


# ----------------------------------------------------------------------------------------------------------
# Caller's model, inplace, atomicity
# ----------------------------------------------------------------------------------------------------------

from helpers import snapshot, same


def test_verbose_summary(capsys):
    FC_Decomposer().decompose(mlp(), percent_removed=0.75)
    out = capsys.readouterr().out
    assert 'FC_Decomposer' in out and 'decomposed 3 of 3' in out
