"Output weighting (`output_grams`): exact at full rank, lower model-output error than input whitening alone, predicted = measured, bad input."
import copy
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.decompose.whiten import apply_rows
from fasterai.decompose.sensitivity import output_grams, output_root
from helpers import rel




def _hidden_directions(conv=False, seed=0):
    "A layer followed by a projection that reads half of its output channels 100× more than the other half."
    torch.manual_seed(seed)
    if conv:
        m = nn.Sequential(nn.Conv2d(12, 32, 3, padding=1, padding_mode='reflect'), nn.Tanh(), nn.Conv2d(32, 6, 1)).eval()
        x = torch.randn(64, 12, 10, 10)
    else:
        m = nn.Sequential(nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 6)).eval()
        x = torch.randn(1024, 48)
    with torch.no_grad(): m[2].weight[:, 16:] *= 0.01
    return m, x


@pytest.mark.parametrize('conv,method', [(False, 'svd'), (True, 'svd'), (True, 'tucker')])
def test_output_weighting_lowers_the_model_output_error(conv, method):
    model, x = _hidden_directions(conv)
    xc, xh = x[: len(x) // 2], x[len(x) // 2:]                       # calibrate on one half, measure on the other
    y = model(xh)
    errs = {}
    for og in (None, 'auto'):
        kw = dict(method=method) if conv else {}
        D = Conv_Decomposer() if conv else FC_Decomposer()
        ranks = {'0': (8, 6) if method == 'tucker' else 8}
        small = D.decompose(model, layers=['0'], ranks=ranks, data=xc, output_grams=og, verbose=False, **kw)
        assert D.report.set_index('name').loc['0', 'status'] == 'decomposed'
        errs[og] = rel(small(xh), y)
    assert errs['auto'] < 0.8 * errs[None], errs                      # measured: 0.71 → 0.50 for tucker, larger gains for svd


@pytest.mark.parametrize('kind', ['linear', 'conv_svd', 'conv_tucker'])
def test_output_weighting_is_exact_at_full_rank(kind):
    torch.manual_seed(1)
    if kind == 'linear':
        model, x = nn.Sequential(nn.Linear(20, 14), nn.GELU(), nn.Linear(14, 5)).eval(), torch.randn(256, 7, 20)
        small = FC_Decomposer().decompose(model, percent_removed=0, allow_growth=True, data=x, output_grams='auto', verbose=False)
    else:
        model = nn.Sequential(nn.Conv2d(5, 9, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1, padding_mode='circular'),
                              nn.ReLU(), nn.Conv2d(9, 4, 3)).eval()
        x = torch.randn(16, 5, 13, 11)
        small = Conv_Decomposer().decompose(model, percent_removed=0, method=kind.split('_')[1], allow_growth=True, data=x,
                                            output_grams='auto', verbose=False)
    assert rel(small(x), model(x)) < 1e-5


def test_predicted_equals_measured_in_the_weighted_norm():
    model, x = _hidden_directions()
    D = FC_Decomposer()
    small = D.decompose(model, layers=['0'], ranks={'0': 5}, data=x, output_grams='auto', verbose=False)
    row = D.report.set_index('name').loc['0']
    assert abs(row.predicted_error - row.output_error) <= 0.01 * row.output_error, row
    # the reported number is ‖P(W − Ŵ)L‖ / ‖PWL‖ on the calibration rows (8 batches of 32, as the decomposer reads them),
    # computed here from the block that was built and the same probes (same seed)
    xc = x[:256].double()
    sigma = xc.T @ xc / len(xc)
    P, _ = output_root(output_grams(model, x, {'0': model[0]}, n_batches=8)['0'])
    W = model[0].weight.detach().double()
    blk = small[0]
    E = P @ (W - blk[1].weight.detach().double() @ blk[0].weight.detach().double())
    measured = ((E @ sigma) * E).sum().sqrt() / (((P @ W) @ sigma) * (P @ W)).sum().sqrt()
    assert abs(float(measured) - row.output_error) <= 1e-6 * row.output_error, (float(measured), row.output_error)


def test_output_grams_leave_the_model_as_it_was_and_check_input():
    model, x = _hidden_directions()
    model.train()
    before = copy.deepcopy(model.state_dict())
    output_grams(model, x, {'0': model[0], '2': model[2]}, n_batches=2)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert not model[0]._forward_hooks and not model[2]._forward_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match='output_grams'):
        FC_Decomposer().decompose(model, data=x, output_grams=5, verbose=False)
    with pytest.raises(ValueError, match="output_grams='auto' needs data"):
        FC_Decomposer().decompose(model, output_grams='auto', verbose=False)
    with pytest.raises(ValueError, match='damping'):
        output_root(torch.eye(3), damping=1.5)
    P, Pi = output_root(torch.zeros(4, 4))                             # a layer the output never reads: no weighting
    assert torch.equal(P, torch.eye(4, dtype=torch.float64))
    P, Pi = output_root(torch.tensor([4., 0., 1.]))                    # a diagonal Gram gives per-channel weights
    assert P.shape == (3,) and torch.allclose(P * Pi, torch.ones(3, dtype=torch.float64))


def test_budget_uses_output_weighting_by_default():
    model, x = _hidden_directions()
    xc, xh = x[:512], x[512:]
    y = model(xh)
    on = decompose(model, budget=0.7, data=xc, verbose=False)
    off = decompose(model, budget=0.7, data=xc, output_grams=None, verbose=False)
    assert abs(n_params(on) - n_params(off)) <= 0.02 * n_params(model)
    assert rel(on(xh), y) < rel(off(xh), y)
