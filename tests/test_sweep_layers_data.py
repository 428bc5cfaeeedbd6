"""Inputs found by the fifth and sixth robustness sweeps: frozen biases, layer buffers, backward hooks, scripted models,
zero-size layers, layers inside blocks, unbatched convs, models whose output carries no gradient, inference mode,
GPT-2's `Conv1D`, single batches passed as `data`, bad `output_grams`, and what `decompose.report` lists."""
import os, warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from helpers import snapshot, same, rel




def mlp(): return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


# ---------- what a block keeps from its layer

@pytest.mark.parametrize('frozen', ['bias', 'weight'])
def test_block_keeps_each_tensors_requires_grad(frozen):
    conv, lin = nn.Conv2d(8, 8, 3), nn.Linear(32, 32)
    for m in (conv, lin): getattr(m, frozen).requires_grad_(False)
    oc = Conv_Decomposer().decompose(nn.Sequential(conv), 0.5, verbose=False)[0]
    of = FC_Decomposer().decompose(nn.Sequential(lin), 0.7, verbose=False)[0]
    for blk in (oc, of):
        assert blk[-1].bias.requires_grad == (frozen != 'bias')
        assert all(l.weight.requires_grad == (frozen != 'weight') for l in blk)


def test_block_keeps_the_layers_buffers():
    m = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Linear(14, 14))
    m[0].register_buffer('scale', torch.tensor(2.)); m[1].register_buffer('mask', torch.arange(14.), persistent=False)
    out = FC_Decomposer().decompose(Conv_Decomposer().decompose(m, 0.5, verbose=False), 0.7, verbose=False)
    assert isinstance(out[0], LowRankConv) and isinstance(out[1], LowRankLinear)
    assert torch.equal(out.state_dict()['0.scale'], torch.tensor(2.))
    assert '1.mask' not in out.state_dict() and torch.equal(out[1].mask, torch.arange(14.))     # still not persistent


# ---------- layers left as they were, with the reason

def test_backward_hooks_leave_the_layer_dense():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    m[2].register_full_backward_hook(lambda *a: None)
    d = Conv_Decomposer(); out = d.decompose(m, 0.5, verbose=False)
    assert type(out[2]) is nn.Conv2d and out[2]._backward_hooks
    assert 'backward hooks' in d.report.set_index('name').loc['2'].reason


def test_zero_size_layers_are_skipped():
    for dec, layer in [(FC_Decomposer(), nn.Linear(0, 5)), (FC_Decomposer(), nn.Linear(5, 0)), (Conv_Decomposer(), nn.Conv2d(3, 0, 3))]:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            dec.decompose(nn.Sequential(layer), 0.5, verbose=False)
        assert 'zero-size' in dec.report.reason[0]
    d = FC_Decomposer(); d.decompose(nn.Sequential(nn.Linear(0, 5)), 0.5, data=torch.randn(4, 0), verbose=False)
    assert 'zero-size' in d.report.reason[0]


def test_reasons_name_the_tensor():
    from torch.nn.utils import parametrize
    class Same(nn.Module):
        def forward(self, x): return x
    lin = nn.Linear(32, 32); parametrize.register_parametrization(lin, 'bias', Same())
    d = FC_Decomposer(); d.decompose(nn.Sequential(lin), 0.7, verbose=False)
    assert d.report.reason[0] == 'bias is parametrized'
    a, b = nn.Linear(32, 32), nn.Linear(32, 32); b.bias = a.bias
    d.decompose(nn.Sequential(a, b), 0.7, verbose=False)
    assert (d.report.reason == 'bias shared with another module').all()


def test_scripted_models_are_refused():
    s = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)))
    for f in (lambda: Conv_Decomposer().decompose(s), lambda: FC_Decomposer().decompose(s), lambda: decompose(s)):
        with pytest.raises(TypeError, match='TorchScript'): f()


def test_layers_inside_a_block_are_not_decomposed_again():
    o1 = Conv_Decomposer().decompose(nn.Sequential(nn.Conv2d(16, 16, 3)), 0.5, verbose=False)
    d = Conv_Decomposer(); o2 = d.decompose(o1, 0.5, layers=['0.1'], verbose=False)
    assert not any(isinstance(m, LowRankBlock) for m in o2[0])
    assert d.report.reason.tolist() == ['already decomposed']


# ---------- decompose(): the report lists every candidate, MACs count every conv

def test_budget_report_lists_skipped_layers():
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ConvTranspose2d(16, 16, 3),
                      nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32 * 6 * 6, 4))
    m[3].register_forward_hook(lambda *a: None)
    decompose(m, 0.6, verbose=False)
    r = decompose.report.set_index('name')
    assert list(r.index) == ['0', '1', '2', '3', '5']                       # the model's order
    assert 'grouped' in r.loc['1'].reason and 'ConvTranspose' in r.loc['2'].reason and 'forward hooks' in r.loc['3'].reason
    assert (r.loc[['1', '2', '3']].params_after == r.loc[['1', '2', '3']].params_before).all()


def test_macs_budget_counts_transposed_convs():
    m = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ConvTranspose2d(16, 64, 3, padding=1), nn.Conv2d(64, 8, 1))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = decompose(m, 0.9, budget_on='macs', input_shape=(1, 16, 16, 16), verbose=False)
    r = decompose.report.set_index('name')
    assert r.loc['1'].macs_before == 16 * 64 * 9 * 16 * 16                # every input pixel scatters a 3×3 kernel
    def macs(model):
        tot = []
        hooks = [mm.register_forward_hook(lambda mm, a, o: tot.append(mm.weight.numel() * (a[0][0, 0].numel() if isinstance(mm, nn.ConvTranspose2d)
                                                                                            else o[0, 0].numel())))
                 for mm in model.modules() if isinstance(mm, (nn.Conv2d, nn.ConvTranspose2d))]
        model(torch.zeros(1, 16, 16, 16)); [h.remove() for h in hooks]
        return sum(tot)
    assert abs(macs(out) / macs(m) - 0.9) < 0.02                             # the budget is on every conv's MACs


def test_zero_sensitivity_layers_stay_dense():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__(); self.body, self.pool = mlp()[:4], nn.Linear(64, 64)
        def forward(self, x):
            h = self.body(x); return h, self.pool(h)                        # the pooler feeds the second output only
    torch.manual_seed(0)
    m, X = TwoHeads().eval(), torch.randn(256, 64)
    decompose(m, 0.7, data=X, verbose=False)
    r = decompose.report.set_index('name')
    assert r.loc['pool'].status == 'skipped' and 'sensitivity 0' in r.loc['pool'].reason
    assert (r.loc[['body.0', 'body.2']].status == 'decomposed').any()


# ---------- calibration data and the model's output

def test_unbatched_conv_inputs_with_output_weighting():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(4, 16, 3), nn.ReLU(), nn.Conv1d(16, 16, 3)).eval()
    x = torch.randn(4, 10)
    out = decompose(m, 0.5, data=[x], verbose=False)
    assert torch.isfinite(out(x)).all() and decompose.report.output_error.notna().any()
    d = Conv_Decomposer(); d.decompose(m, 0.5, data=[x], output_grams='auto', verbose=False)
    assert d.report.output_error.notna().all()


def test_output_without_gradient_falls_back_with_a_warning():
    class NoGrad(nn.Module):
        def __init__(self): super().__init__(); self.f = mlp()
        @torch.no_grad()
        def forward(self, x): return self.f(x)
    torch.manual_seed(0)
    m, X = NoGrad().eval(), torch.randn(256, 64)
    with pytest.warns(UserWarning, match='autograd'): out = decompose(m, 0.7, data=X, verbose=False)
    assert abs(n_params(out) / n_params(m) - 0.7) < 0.02                    # not every layer at rank 1


def test_decompose_under_inference_mode():
    torch.manual_seed(0)
    m, X = mlp().eval(), torch.randn(256, 64)
    ref = decompose(m, 0.6, data=X, verbose=False); rr = decompose.report.ranks.astype(str).tolist()
    with torch.inference_mode(): out = decompose(m, 0.6, data=X, verbose=False)
    assert decompose.report.ranks.astype(str).tolist() == rr
    out.train(); out(torch.randn(4, 64)).sum().backward()                   # its parameters are ordinary tensors
    assert all(p.grad is not None for p in out.parameters())


def test_single_batches_as_data():
    torch.manual_seed(0)
    m, X, y = mlp(), torch.randn(32, 64), torch.randint(0, 10, (32,))
    with pytest.raises(TypeError, match=r'one \(input, target\) batch'): decompose(m, 0.6, data=(X, y), verbose=False)
    class Kw(nn.Module):
        def __init__(self): super().__init__(); self.f = mlp()
        def forward(self, inputs, scale=1.0): return self.f(inputs) * scale
    k = Kw()
    out = decompose(k, 0.6, data={'inputs': X}, verbose=False)             # one dict batch: read as [batch]
    assert decompose.report.output_error.notna().any() and torch.isfinite(out(X)).all()


def test_data_that_the_model_cannot_run_on():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).double()
    for dec in (Conv_Decomposer(), FC_Decomposer()):
        with pytest.raises(ValueError, match='does not run on the first batch of data'):
            dec.decompose(m, 0.5, data=torch.randn(4, 3, 8, 8), verbose=False)
    emb = nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r'input_shape=\(1, 12\)'):
        decompose(emb, 0.5, budget_on='macs', input_shape=(1, 12), data=[torch.randint(0, 10, (2, 12))], verbose=False)


def test_bad_output_grams_are_named():
    m, X = mlp(), torch.randn(32, 64)
    with pytest.raises(ValueError, match=r"output_grams\['0'\] must be a \(64, 64\)"):
        FC_Decomposer().decompose(m, 0.5, data=X, output_grams={'0': torch.eye(5)}, verbose=False)
    with pytest.raises(ValueError, match="'typo' is not a Linear"):
        FC_Decomposer().decompose(m, 0.5, data=X, output_grams={'typo': torch.eye(64)}, verbose=False)


def test_export_and_load_a_decomposed_digits_learner(tmp_path):
    from fastai.learner import Learner, load_learner
    from fasterai.data.digits import digits_dls, digits_cnn
    import fasterai.decompose.learner                                     # Learner.decompose
    learn = Learner(digits_dls(), digits_cnn(width=8, hidden=32), loss_func=nn.CrossEntropyLoss(), path=tmp_path)
    learn.decompose(percent_removed=0.5, verbose=False, progress=False)
    learn.export('m.pkl')                                                  # needed DataLoaders whose datasets can be emptied
    back = load_learner(tmp_path / 'm.pkl')
    x = learn.dls.valid.one_batch()[0]
    assert isinstance(back.model[4], LowRankConv) and torch.allclose(back.model.eval()(x), learn.model.eval()(x))


# ---------- GPT-2's Conv1D (a Linear with a transposed weight)

transformers = pytest.importorskip('transformers')


def tiny_gpt2():
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                          bos_token_id=0, eos_token_id=0)).eval()


def test_gpt2_conv1d_full_rank_is_exact_and_the_caller_is_untouched():
    g = tiny_gpt2(); snap = snapshot(g)
    ids = torch.randint(0, 100, (4, 16)); ref = g(ids).last_hidden_state
    d = FC_Decomposer(); out = d.decompose(g, percent_removed=0.0, allow_growth=True, verbose=False)
    assert (d.report.status == 'decomposed').sum() == 8 and (d.report.type == 'Conv1D').all()
    assert rel(out(ids).last_hidden_state, ref) < 1e-5
    assert same(g, snap)
    assert out.h[0].attn.c_attn.nf == 96 and out.h[0].attn.c_attn.nx == 32


def test_gpt2_layers_left_alone_keep_their_type_and_inplace_works():
    g = tiny_gpt2()
    ids = torch.randint(0, 100, (4, 16)); ref = g(ids).last_hidden_state
    d = FC_Decomposer(); out = d.decompose(g, percent_removed=0.5, layers=['h.0.mlp'], verbose=False)
    assert isinstance(out.h[0].mlp.c_fc, LowRankLinear) and type(out.h[0].attn.c_attn).__name__ == 'Conv1D'
    assert out.h[0].attn.c_attn.weight.shape == g.h[0].attn.c_attn.weight.shape
    data = [{'input_ids': torch.randint(0, 100, (8, 16))} for _ in range(4)]
    res = decompose(g, 0.6, data=data, inplace=True, verbose=False)
    assert res is g and isinstance(g.h[1].mlp.c_proj, LowRankLinear)
    assert decompose.report.output_error.notna().all() and rel(g(ids).last_hidden_state, ref) < 0.5


def test_plot_report_reads_gpt2_conv1d_rows():
    import matplotlib; matplotlib.use('Agg')
    g = tiny_gpt2()
    decompose(g, 0.7, data=[{'input_ids': torch.randint(0, 100, (2, 16))}], verbose=False)
    fig = plot_report(decompose.report, g)
    assert len(fig.axes) == 3 and len(fig.axes[-1].lines) >= 2               # params, MACs, spectra drawn for the Conv1D rows


def test_budget_only_picks_blocks_the_decomposer_takes():
    "A strided conv's Tucker block can have fewer params but more MACs: the decomposer refuses it, so the budget must not count on it."
    m = nn.Sequential(nn.Conv2d(64, 16, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = decompose(m, budget=0.6, method='tucker', input_shape=(1, 64, 32, 32), verbose=False)
    r = decompose.report
    kept = n_params(out) / n_params(m)
    planned = (r.params_after.sum() + (n_params(m) - r.params_before.sum())) / n_params(m)
    assert kept < 0.6 + 0.01 and abs(kept - planned) < 1e-9                 # what was planned is what was made
    assert not r.reason.fillna('').str.contains('would not reduce').any()
    assert r.method.map(lambda v: v is None).sum() == 0                      # missing values are NaN, not None
