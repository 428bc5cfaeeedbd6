"Inputs found by a robustness sweep: zero layers and zero inputs, user subclasses, parents that read layer attributes, bad arguments."
import copy, warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.decompose.stats import collect_pair_stats, compensated_target
from helpers import rel




def test_compact_on_a_zero_linear():
    lin = nn.Linear(64, 100); nn.init.zeros_(lin.weight)              # torchvision's untrained ViT head is all zero
    out = FC_Decomposer().decompose(nn.Sequential(lin), compact=True, verbose=False)
    x = torch.randn(3, 64)
    assert torch.isfinite(out(x)).all() and torch.allclose(out(x), lin(x))


def test_compact_on_a_rank_deficient_linear_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(40, 60)
    with torch.no_grad(): lin.weight.copy_(torch.randn(60, 5) @ torch.randn(5, 40))      # rank 5 < the kept rank
    out = FC_Decomposer().decompose(nn.Sequential(lin), ranks={'0': 20}, compact=True, verbose=False)
    assert isinstance(out[0][1], CompactLinear)
    x = torch.randn(8, 40)
    assert rel(out(x), lin(x)) < 1e-5


def test_tucker_with_data_on_a_zero_conv():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)); nn.init.zeros_(m[2].weight)
    x = torch.randn(4, 3, 16, 16)
    d = Conv_Decomposer()
    out = d.decompose(m, method='tucker', data=x, verbose=False)
    assert torch.isfinite(out(x)).all() and torch.allclose(out(x), m(x), atol=1e-6)
    row = d.report.set_index('name').loc['2']
    assert row.status == 'decomposed' and row.output_error == 0


def test_compensate_with_all_zero_inputs_keeps_the_weight():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
    zeros = torch.zeros(4, 3, 16, 16)
    comp = Conv_Decomposer().decompose(m, method='svd', data=zeros, compensate=True, percent_removed=0., allow_growth=True, verbose=False)
    x = torch.randn(2, 3, 16, 16)
    assert rel(comp(x), m(x)) < 1e-5                                  # inputs that excite nothing leave W as it was (not 0)


def test_compensated_target_pulls_toward_w_in_unexcited_directions():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 4))
    x = torch.randn(256, 6); x[:, 3:] = 0                             # the last three inputs never move
    twin = copy.deepcopy(ref)
    st = collect_pair_stats(ref, twin, x, ref[0], twin[0], n_batches=None)
    M = compensated_target(ref[0].weight, st)
    W = ref[0].weight.detach().double()
    assert torch.allclose(M[:, 3:], W[:, 3:], atol=1e-6)             # untouched where there is no signal
    assert torch.allclose(M[:, :3], W[:, :3], atol=1e-4)             # and the same model reproduces itself


class MyConv(nn.Conv2d):
    def __init__(self, ci, co): super().__init__(ci, co, 3, padding=1)       # its own __init__, the inherited forward


@pytest.mark.parametrize('method', ['svd', 'tucker', 'spatial', 'cp'])
def test_conv_subclass_with_its_own_init(method):
    torch.manual_seed(0)
    m = nn.Sequential(MyConv(8, 16), nn.ReLU(), MyConv(16, 16))
    out = Conv_Decomposer().decompose(m, method=method, percent_removed=0.7, verbose=False)
    assert out(torch.randn(1, 8, 9, 9)).shape == (1, 16, 9, 9)
    assert isinstance(out[2], LowRankConv) and all(type(l) is nn.Conv2d for l in out[2])   # blocks are plain torch layers
    full = Conv_Decomposer().decompose(m, method='svd', percent_removed=0., allow_growth=True, verbose=False)
    x = torch.randn(2, 8, 9, 9)
    assert rel(full(x), m(x)) < 1e-5


class ReadsAttrs(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(3, 8, 3); self.fc = nn.Linear(8 * 14 * 14, 10)
    def forward(self, x):
        h = self.conv(x)
        assert h.shape[1] == self.conv.out_channels
        return self.fc(h.reshape(-1, self.fc.in_features))


@pytest.mark.parametrize('input_shape', [None, (1, 3, 16, 16)])
def test_parents_reading_layer_hyperparameters_still_run(input_shape):
    model = ReadsAttrs().eval()
    out = decompose(model, budget=0.5, input_shape=input_shape, verbose=False)
    assert isinstance(out.fc, LowRankLinear) and (out.fc.in_features, out.fc.out_features) == (1568, 10)
    assert out(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    conv = Conv_Decomposer().decompose(model, method='tucker', percent_removed=0.3, verbose=False).conv
    assert isinstance(conv, LowRankConv)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (3, 8, (3, 3), (1, 1), (0, 0))


def test_decompose_never_returns_the_callers_object():
    model = nn.Sequential(nn.Linear(8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = decompose(model, budget=0.5, verbose=False)            # nothing to gain: no layer is decomposed
    assert out is not model and out[0] is not model[0]
    assert torch.equal(out[0].weight, model[0].weight)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert decompose(model, budget=0.5, inplace=True, verbose=False) is model


def test_bad_arguments_name_themselves():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(TypeError, match='not_a_kwarg'): decompose(m, budget=0.5, not_a_kwarg=1)
    with pytest.raises(ValueError, match='percent_removed'): decompose(m, budget=0.5, percent_removed=0.9)
    with pytest.raises(ValueError, match='ranks'): decompose(m, budget=0.5, ranks={'0': 3})
    with pytest.raises(ValueError, match='input_shape'): decompose(m, budget=0.5, input_shape=(1, 3, 0, 16))
    with pytest.raises(ValueError, match=r'input_shape=\(1, 4, 16, 16\)'): decompose(m, budget=0.5, input_shape=(1, 4, 16, 16))
    with pytest.raises(ValueError, match='n_batches'): decompose(m, data=x, n_batches='a')
    with pytest.raises(TypeError, match='layers'): Conv_Decomposer().decompose(m, layers=5)
    with pytest.raises(TypeError, match='exclude'): FC_Decomposer().decompose(m, exclude=3)


def test_ranks_must_name_layers_not_containers():
    import torchvision
    with pytest.raises(ValueError, match="'layer1' is a Sequential.*layer1.0.conv1"):
        Conv_Decomposer().decompose(torchvision.models.resnet18(), method='tucker', ranks={'layer1': 8}, verbose=False)


@pytest.mark.parametrize('kw', [dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode='reflect'),
                                dict(padding='same', padding_mode='circular'), dict(stride=2, bias=False)])
def test_data_aware_spatial_through_the_decomposer(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), **kw)
    x = torch.nn.functional.avg_pool2d(torch.randn(16, 6, 17, 19), 3, 1, 1)
    full = Conv_Decomposer().decompose(conv, method='spatial', percent_removed=0., allow_growth=True, data=x, verbose=False)
    assert rel(full(x), conv(x)) < 1e-5                                           # exact at full rank, with data
    dw, dd = Conv_Decomposer(), Conv_Decomposer()
    w = dw.decompose(conv, method='spatial', percent_removed=0.6, allow_growth=True, verbose=False)
    d = dd.decompose(conv, method='spatial', percent_removed=0.6, allow_growth=True, data=x, verbose=False)
    assert rel(d(x), conv(x)) < rel(w(x), conv(x))
    row = dd.report.iloc[0]
    assert abs(row.predicted_error - row.output_error) <= 0.01 * row.output_error + 1e-9


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize('call', ['conv', 'fc', 'budget'])
def test_one_shot_iterators_are_refused(call):
    m = _cnn()
    X = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    f = {'conv': lambda d: Conv_Decomposer().decompose(m, data=d, verbose=False),
         'fc': lambda d: FC_Decomposer().decompose(m, data=d, verbose=False),
         'budget': lambda d: decompose(m, budget=0.5, data=d, verbose=False)}[call]
    with pytest.raises(TypeError, match='re-iterable'): f(x for x in X)
    with pytest.raises(TypeError, match='re-iterable'): f(iter(X))
    f(X)                                                              # a list of the same batches works


def test_skipped_rows_keep_their_macs():
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    f = FC_Decomposer()
    f.decompose(m, input_shape=(1, 32), percent_removed=0.1, verbose=False)          # both layers would grow: skipped
    r = f.report
    assert (r.status == 'skipped').all() and (r.macs_after == r.macs_before).all()
    c = Conv_Decomposer()
    c.decompose(nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3)), method='tucker', input_shape=(1, 8, 10, 10), verbose=False)
    one = c.report.set_index('name').loc['0']                             # 1×1 under Tucker: skipped, MACs still counted
    assert one.status == 'skipped' and one.macs_before == 8 * 8 * 100 and one.macs_after == one.macs_before
    assert c.report.reason.dtype == object


def test_compact_models_trace_with_fx_and_fold_batchnorm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    with torch.no_grad(): m[1].running_mean.uniform_(-1, 1); m[1].running_var.uniform_(0.5, 2)
    d = FC_Decomposer().decompose(m, compact=True, layers=['7'], ranks={'7': 8}, verbose=False)
    assert isinstance(d[7][1], CompactLinear)
    for x in (torch.randn(2, 3, 10, 10), torch.randn(64, 3, 10, 10)):   # both of CompactLinear's paths
        assert torch.allclose(torch.fx.symbolic_trace(d)(x), d(x))
    folder = BN_Folder()
    f = folder.fold(d, verbose=False)
    assert folder.report.folded.all()
    x = torch.randn(4, 3, 10, 10)
    assert rel(f(x), d(x)) < 1e-5


def test_linear_batchnorm_fold_without_sample_warns():
    m = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)).eval()
    with pytest.warns(UserWarning, match='sample='): BN_Folder().fold(m, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        BN_Folder().fold(m, sample=torch.randn(2, 8), verbose=False)     # checked: no warning


def test_budget_on_an_already_decomposed_model_says_so():
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    once = decompose(m, budget=0.5, compact=True, verbose=False)
    with pytest.warns(UserWarning, match='nothing more to cut'): again = decompose(once, budget=0.5, verbose=False)
    assert n_params(again) == n_params(once)                                   # a share of the dense model: met already
    with pytest.raises(ValueError, match='already decomposed'): decompose(once, budget=0.5, budget_of='model', verbose=False)


def test_inplace_decompose_is_atomic_across_the_conv_and_linear_passes(monkeypatch):
    import fasterai.decompose.fc as fcmod
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    def boom(*a, **k): raise RuntimeError('boom')
    monkeypatch.setattr(fcmod, 'linear_block', boom)
    with pytest.raises(RuntimeError, match='boom'): decompose(m, 0.3, input_shape=(1, 64, 4, 4), inplace=True, verbose=False)
    assert [type(l) for l in m] == [nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    monkeypatch.undo()
    out = decompose(m, 0.3, input_shape=(1, 64, 4, 4), inplace=True, verbose=False)
    assert out is m and isinstance(m[0], LowRankConv) and isinstance(m[3], LowRankLinear)


class Twice(nn.Module):
    "a(b(a(x))): a's first call sees inputs in dims 0-3, its second call in dims 4-15."
    def __init__(self):
        super().__init__(); self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.b.weight.zero_(); self.b.weight[4:, :12] = torch.randn(12, 12)
    def forward(self, x): return self.a(self.b(self.a(x)))


@pytest.mark.parametrize('compensate', [False, True])
def test_a_layer_called_twice_is_calibrated_on_both_calls(compensate):
    torch.manual_seed(0)
    m = Twice()
    x = torch.zeros(256, 16); x[:, :4] = torch.randn(256, 4)
    d = FC_Decomposer()
    n = d.decompose(m, ranks={'a': 6}, exclude=['b'], data=[x], compensate=compensate, allow_growth=True, verbose=False)
    seq_err = rel(n(x), m(x))
    p = FC_Decomposer().decompose(m, ranks={'a': 6}, exclude=['b'], data=[x], sequential=False, allow_growth=True, verbose=False)
    assert seq_err <= rel(p(x), m(x)) + 1e-6                          # as good as the one-pass statistics of both calls
    assert d.report.output_error[0] > 0.01                            # and the report does not claim a near-perfect fit


def test_meta_device_layers_are_skipped_with_a_reason():
    d = FC_Decomposer()
    out = d.decompose(nn.Sequential(nn.Linear(16, 32)).to('meta'), 0.5, verbose=False)
    assert d.report.status[0] == 'skipped' and 'meta' in d.report.reason[0]
    assert out[0].weight.is_meta


def test_budget_with_no_eligible_layer_says_why():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match='reads .linear1.weight directly'): decompose(enc, 0.5, verbose=False)


def test_energy_threshold_one_keeps_the_small_tail():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad(): m[0].weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64) + 1e-3 * torch.randn(64, 64))
    d = FC_Decomposer()
    n = d.decompose(m, energy_threshold=1.0, allow_growth=True, verbose=False)
    assert d.report.ranks[0] == (64,)
    x = torch.randn(8, 64)
    assert rel(n(x), m(x)) < 1e-5
    from fasterai.decompose.factorize import spectrum
    s = spectrum(m[0].weight.detach())
    assert (s > 0).all() and torch.allclose(s, torch.linalg.svdvals(m[0].weight.detach().double()), rtol=1e-6)
