"The compact low-rank Linear (`compact=True`, `CompactLinear`): same product as the plain block, k(m+n) − k² parameters."
import copy, io
import pytest, torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck
from fasterai.decompose.all import *
from fasterai.decompose.blocks import compact_linear_block, linear_block, linear_layers
from fasterai.decompose.budget import decompose
from helpers import rel




@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 40), n=st.integers(1, 40), kf=st.floats(0.01, 1.0), bias=st.booleans(),
       lead=st.sampled_from([(5,), (2, 3), (2, 1, 3), (48,)]), dt=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10 ** 6))
def test_compact_block_is_the_plain_block(m, n, kf, bias, lead, dt, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias).to(dt)
    k = max(1, min(m, n, round(kf * min(m, n))))
    A, B, _ = lowrank(lin.weight.detach(), k)
    plain, comp = linear_block(lin, A, B), compact_linear_block(lin, A, B)
    x = torch.randn(*lead, n, dtype=dt)
    assert rel(comp(x), plain(x)) < 1e-5
    assert n_params(comp) == k * (m + n) - k * k + (m if bias else 0)
    assert n_params(linear_layers(lin, k, device='meta', compact=True)) == n_params(comp)
    assert block_macs(comp, 3) == 3 * (k * (m + n) - k * k)
    assert comp[1].weight.dtype == dt and comp[1].order.dtype == torch.long
    assert sorted(comp[1].order.tolist()) == list(range(m))


def test_compact_decomposes_where_the_plain_form_breaks_even():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(8, 64)
    plain, d0 = FC_Decomposer(), FC_Decomposer()
    plain.decompose(model, ranks={'0': 40, '2': 40}, verbose=False)
    assert (plain.report.status == 'skipped').all()                   # 40·128 = 5120 ≥ 4096 + 64
    small = d0.decompose(model, ranks={'0': 40, '2': 40}, compact=True, verbose=False)
    assert (d0.report.status == 'decomposed').all()
    assert (d0.report.params_after == 40 * 128 - 1600 + 64).all()
    assert isinstance(small[0][1], CompactLinear)
    full, d1 = FC_Decomposer(), FC_Decomposer()
    d1.decompose(model, percent_removed=0, compact=True, verbose=False)
    assert (d1.report.status == 'skipped').all() and d1.report.reason.str.contains('break-even rank < 64').all()
    exact = FC_Decomposer().decompose(model, percent_removed=0, compact=True, allow_growth=True, verbose=False)
    assert rel(exact(x), model(x)) < 1e-5


def test_compact_data_aware_output_weighted_exact_at_full_rank_and_state_dict():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12)).eval()
    x = torch.randn(64, 5, 24)
    small = FC_Decomposer().decompose(model, percent_removed=0, allow_growth=True, data=x, output_grams='auto', compact=True, verbose=False)
    assert rel(small(x), model(x)) < 1e-5
    cut = FC_Decomposer().decompose(model, percent_removed=0.5, data=x, output_grams='auto', compact=True, verbose=False)
    buf = io.BytesIO(); torch.save(cut.state_dict(), buf); buf.seek(0)
    again = FC_Decomposer().decompose(model, percent_removed=0.5, compact=True, verbose=False)   # same shapes, other values
    again.load_state_dict(torch.load(buf))
    assert torch.equal(again(x), cut(x))
    assert rel(copy.deepcopy(cut)(x), cut(x)) == 0


def test_compact_attributes_second_call_and_bad_input():
    lin = nn.Linear(30, 20).double().train()
    lin.weight.requires_grad_(False); lin.bias.requires_grad_(False)
    d = FC_Decomposer()
    blk = d.decompose(lin, percent_removed=0.5, compact=True, verbose=False)
    assert blk.training and all(p.dtype == torch.float64 and not p.requires_grad for p in blk.parameters())
    d2 = FC_Decomposer()
    d2.decompose(nn.Sequential(blk), compact=True, verbose=False)
    assert d2.report.reason.iloc[0] == 'already decomposed'
    with pytest.raises(TypeError, match='compact'):
        FC_Decomposer().decompose(lin, compact='yes', verbose=False)
    with pytest.raises(TypeError, match='compact'):
        decompose(nn.Sequential(lin), compact=1, verbose=False)
    with pytest.raises(ValueError, match='in_features'):
        CompactLinear(5, 3)


@pytest.mark.parametrize('budget', [0.4, 0.7])
def test_compact_budget_hits_target_and_keeps_more_rank(budget):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 96))
    x = torch.randn(512, 96)
    out = {}
    for compact in (False, True):
        small = decompose(model, budget=budget, data=x, compact=compact, verbose=False)
        assert abs(n_params(small) / n_params(model) - budget) < 0.01
        r = decompose.report
        out[compact] = r[r.status == 'decomposed'].ranks.str[0].sum()
    assert out[True] > out[False]
