"""A fastai user's first hour (issue 20): what used to fail silently now says so, and the Learner path saves, loads,
plots and fine-tunes the fastai way. Each test asserts what holds by construction, never a trained outcome."""
import contextlib, io, re, tempfile, warnings
from pathlib import Path
import pytest, torch
from torch import nn
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *
from fastai.callback.training import ShortEpochCallback
from fasterai.data.digits import digits_dls, digits_cnn, digits_arrays
from fasterai.decompose.all import *
from fasterai.decompose.blocks import LowRankBlock, n_params
from fasterai.decompose.checkpoint import load_decomposed
from fasterai.decompose.report import plot_report
import fasterai.decompose.learner as L


@pytest.fixture(scope='module')
def trained():
    "A digits CNN after a short training run (state_dict), and the path its Learner saves to."
    set_seed(0)
    learn = Learner(digits_dls(seed=0), digits_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3, cbs=ShortEpochCallback(pct=0.3))
    return {k: v.clone() for k, v in learn.model.state_dict().items()}, Path(tempfile.mkdtemp())


def make(trained):
    state, path = trained
    set_seed(0)
    learn = Learner(digits_dls(seed=0), digits_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=path)
    learn.model.load_state_dict(state)
    return learn


def messages(w): return [str(x.message) for x in w]


def test_second_budget_call_does_not_wreck(trained):
    learn = make(trained)
    with learn.no_bar(): learn.decompose(budget=0.5, verbose=False)
    once = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): rep = learn.decompose(budget=0.5, verbose=False)
    assert any("budget_of='dense'" in m and 'nothing more to cut' in m for m in messages(w))
    assert learn.model.state_dict().keys() == once.keys()                    # the same blocks: nothing cut again
    assert (rep.status != 'decomposed').all()


def test_a_cut_that_wrecks_says_so(trained):
    learn = make(trained)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.decompose(percent_removed=0.97, n_batches=0, verbose=False)
    m = [x for x in messages(w) if 'rank ≤ 2' in x]
    assert m and re.search(r'\b4 \(rank [12] of 64', m[0])                    # the layer, its rank and its full rank


def test_budget_path_shows_progress_and_summary(trained, monkeypatch):
    learn = make(trained)
    bars = []
    class Bar:
        def __init__(self, it, leave=False): bars.append(self); self.n = []; self.comment = ''
        def update(self, v): self.n.append(v)
    monkeypatch.setattr(L, 'progress_bar', Bar)
    with contextlib.redirect_stdout(io.StringIO()) as out: learn.decompose(budget=0.5)
    assert 'decompose: ' in out.getvalue() and 'eligible layers decomposed' in out.getvalue()
    assert len(bars) == 1 and bars[0].n[0] == 0 and len(bars[0].n) >= 2        # drawn, then ticked per layer
    assert bars[0].n == sorted(bars[0].n) and bars[0].n[-1] > 0
    with pytest.raises(ValueError, match='method must be one of'): learn.decompose(method='bogus')
    assert len(bars) == 1                                                       # a bad argument draws no bar


def test_calibration_data_is_checked(trained):
    learn = make(trained)
    xt, _, _, _ = digits_arrays(size=8, seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.decompose(data=xt[:64], verbose=False)
    assert any('data: its inputs have shape (1, 8, 8)' in m and "(1, 32, 32)" in m for m in messages(w))
    learn = make(trained)
    x32, y32, _, _ = digits_arrays(size=32, seed=0)
    ds = torch.utils.data.TensorDataset(x32[:128], y32[:128])                  # samples, read in batches
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): rep = learn.decompose(data=ds, verbose=False)
    assert not any('data: its inputs' in m for m in messages(w)) and (rep.status == 'decomposed').sum() == 3
    assert L.shape_mismatch(torch.zeros(2, 7), torch.zeros(2, 9)) is False    # token sequences vary in length


def test_weight_only_large_cut_says_so(trained):
    learn = make(trained)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.decompose(n_batches=0, verbose=False)
    assert any('n_batches=0' in m for m in messages(w))
    learn = make(trained)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        with learn.no_bar(): learn.decompose(n_batches=0, percent_removed=0.1, verbose=False)
    assert not any('n_batches=0' in m for m in messages(w))                      # a small cut: fine from weights


def test_save_load_the_fastai_way(trained):
    learn = make(trained)
    with learn.no_bar(): learn.decompose(verbose=False)
    learn.save('dec')
    fresh = make(trained)
    with pytest.raises(RuntimeError, match=r"learn.load_decomposed\('dec'\)"): fresh.load('dec')
    fresh.load_decomposed('dec')
    x = learn.dls.valid.one_batch()[0]
    learn.model.eval(); fresh.model.eval()
    assert torch.allclose(fresh.model(x), learn.model(x), atol=1e-5)
    saved = torch.load(learn.path / 'models' / 'dec.pth', weights_only=False)
    assert set(saved) == {'model', 'opt'}
    back = load_decomposed(digits_cnn(), saved).eval()                        # fastai's checkpoint dict, as is
    assert torch.allclose(back(x), learn.model(x), atol=1e-5)
    for strict in (True, False):
        with pytest.raises(ValueError, match='none of the') as e: load_decomposed(digits_cnn(), {'x.weight': torch.zeros(1)}, strict=strict)
        assert 'strict=False' not in str(e.value)


def test_fine_tune_recipe_never_worse_on_validation(trained):
    learn = make(trained)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 2e-3, cbs=ShortEpochCallback(pct=0.2))   # the run the recipe reads
    with learn.no_bar(): learn.decompose(verbose=False)
    before = float(learn.validate()[0])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ft = learn.fine_tune_decomposed(cbs=ShortEpochCallback(pct=0.3))
    assert abs(ft['lr'] - 2e-4) < 1e-6                                        # the peak of the run ÷ 10
    assert float(learn.validate()[0]) <= before + 1e-6
    assert ft['kept'] in ('fine-tuned', 'before') and (ft['kept'] == 'before') == (ft['valid_loss_after'] > before)
    with pytest.raises(ValueError, match='lr'): learn.fine_tune_decomposed(lr=-1)


def test_plot_report_from_learner_or_decomposed_model(trained):
    learn = make(trained)
    with learn.no_bar(): learn.decompose(verbose=False)
    for fig in (plot_report(learn), plot_report(learn.decompose_report, learn.model)):
        assert len(fig.axes) == 3 and fig.axes[0].get_yscale() == 'log' and 'MACs' in fig.axes[1].get_title()
        assert 'spectra' in fig.axes[2].get_title()


def test_report_lists_kept_layers_and_no_empty_columns(trained):
    learn = make(trained)
    with contextlib.redirect_stdout(io.StringIO()) as out: rep = learn.decompose(fc=True)
    assert list(rep.name) == ['0', '4', '8', '14', '16']
    assert rep.set_index('name').reason[['0', '16']].str.startswith(('keep_first', 'keep_last')).all()
    assert 'ms_before' not in rep and 'ms_after' not in rep                   # nothing was timed
    conv_only = nn.Sequential(nn.Conv2d(1, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 4, 3))
    with contextlib.redirect_stdout(io.StringIO()) as out: FC_Decomposer().decompose(conv_only)
    assert '0 of 0' not in out.getvalue() and out.getvalue() == ''


@pytest.mark.parametrize('shape', [(16, 40), (40, 16), (12, 12)])
def test_nuclear_direction_is_uv(shape):
    torch.manual_seed(0)
    W = torch.randn(shape[0], 5) @ torch.randn(5, shape[1])                  # rank 5: a null space to leave out
    G = L.NuclearNormCallback.direction(W)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = int((S > 1e-6 * S[0]).sum())
    assert r == 5 and torch.allclose(G.double(), U[:, :r] @ Vh[:r], atol=1e-4)
    assert torch.allclose((W * G).sum().double(), S.sum(), rtol=1e-4)         # ⟨W, UVᵀ⟩ is the nuclear norm


def test_decompose_callback_writes_after_the_table(trained):
    learn = make(trained)
    assert L.DecomposeCallback.order > L.Recorder.order                       # decomposing counts in the epoch's time
    cb = L.DecomposeCallback(at_epoch=1)
    with contextlib.redirect_stdout(io.StringIO()) as out: learn.fit(2, 1e-3, cbs=[cb, ShortEpochCallback(pct=0.2)])
    lines = out.getvalue().splitlines()
    rows = [i for i, l in enumerate(lines) if l.split()[:1] in (['0'], ['1'])]
    summary = [i for i, l in enumerate(lines) if l.startswith(('Conv_Decomposer', 'FC_Decomposer'))]
    assert cb.summary and summary and min(summary) > max(rows)
