"""`min_speedup=`: a block that is not faster than its layer at the layer's input shape is left out, and the report says why.

The decisions are tested with a stand-in timer (timings are for benchmarks, not tests); one test runs the real timer
and checks only what it returns, not which is faster."""
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.core import Decomposer, time_pair
from helpers import snapshot, same


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64),
                         nn.ReLU(), nn.Linear(64, 10))


def fake_timer(ms):
    "A stand-in for `Decomposer.timer` (`time_pair`) that returns `ms(layer, block)` and records the input shapes it was given."
    seen = []
    def f(a, b, x, *args, **kwargs):
        seen.append((a, tuple(x.shape), x.dtype))
        return ms(a, b)
    f.seen = seen
    return f


@pytest.mark.parametrize('method', ['tucker', 'svd', 'cp'])
def test_slower_blocks_are_left_dense(monkeypatch, method):
    m = cnn()
    snap = snapshot(m)
    timer = fake_timer(lambda a, b: (1.0, 2.0))                     # every block twice as slow as its layer
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    d = Conv_Decomposer()
    out = d.decompose(m, method=method, percent_removed=0.75, input_shape=(2, 3, 16, 16), min_speedup=1.0, cp_iter=5, verbose=False)
    rep = d.report
    timed = rep[rep.ms_before.notna()]
    assert len(timed) >= 2 and (timed.status == 'skipped').all()
    assert timed.reason.str.contains('block not faster').all() and timed.reason.str.contains('min_speedup=1.0').all()
    assert (timed.params_after == timed.params_before).all() and (timed.macs_after == timed.macs_before).all()
    assert not any(isinstance(x, LowRankBlock) for x in out.modules())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(out(x), m(x)) and same(m, snap)
    shapes = {s for _, s, _ in timer.seen}
    assert shapes <= {(2, 3, 16, 16), (2, 32, 16, 16)} and (2, 32, 16, 16) in shapes
    assert all(dt == torch.float32 for _, _, dt in timer.seen)


def test_faster_blocks_are_kept_and_the_margin_counts(monkeypatch):
    m = cnn()
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(fake_timer(lambda a, b: (1.2, 1.0))))   # 1.2× faster
    kept, margin = Conv_Decomposer(), Conv_Decomposer()
    out = kept.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), min_speedup=1.0, verbose=False)
    assert (kept.report.status == 'decomposed').sum() >= 2 and kept.report.reason.isna().all()
    out2 = margin.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), min_speedup=1.5, verbose=False)
    assert (margin.report.status == 'decomposed').sum() == 0
    assert margin.report.reason.str.contains(r'1.20× < min_speedup=1.5', regex=False).all()
    assert 'timed layers 3.60 ms → 3.60 ms' in margin.summary()              # left dense: each keeps its own time
    assert 'timed layers 3.60 ms → 3.00 ms' in kept.summary()


def test_only_the_slow_layers_are_refused(monkeypatch):
    m = cnn()
    def ms(layer, block): return (1.0, 2.0) if layer.in_channels == 3 else (2.0, 1.0)   # the stem's block is slower
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(fake_timer(ms)))
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), min_speedup=1.0, verbose=False)
    st = d.report.set_index('name').status
    assert st['0'] == 'skipped' and st['2'] == 'decomposed' and st['4'] == 'decomposed'
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[2], LowRankBlock)


def test_fc_with_data_times_at_the_token_shape(monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32))
    timer = fake_timer(lambda a, b: (1.0, 0.5))
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    d = FC_Decomposer()
    data = [torch.randn(4, 7, 32) for _ in range(2)]
    out = d.decompose(m, percent_removed=0.6, data=data, min_speedup=1.0, verbose=False)
    assert (d.report.status == 'decomposed').all() and d.report.ms_after.eq(0.5).all()
    assert {s for _, s, _ in timer.seen} == {(4, 7, 32), (4, 7, 96)}
    assert torch.isfinite(out(data[0])).all()


def test_bad_min_speedup():
    m = cnn()
    for bad in (0, -1.0, float('inf'), float('nan'), 'fast', True):
        with pytest.raises(ValueError, match='min_speedup must be'):
            Conv_Decomposer().decompose(m, input_shape=(1, 3, 16, 16), min_speedup=bad, verbose=False)
    with pytest.raises(ValueError, match='input_shape= or data='):
        Conv_Decomposer().decompose(m, min_speedup=1.0, verbose=False)
    with pytest.raises(ValueError, match='input_shape= or data='):
        FC_Decomposer().decompose(m, min_speedup=1.0, verbose=False)


def test_real_timer_fills_the_report():
    m = cnn()
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), min_speedup=1.0, verbose=False)
    rep = d.report
    timed = rep[rep.ms_before.notna()]
    assert len(timed) >= 2 and (timed.ms_before > 0).all() and (timed.ms_after > 0).all()
    kept = timed[timed.status == 'decomposed']
    assert (kept.ms_before >= kept.ms_after).all()                       # by construction, whatever the machine
    refused = timed[timed.status == 'skipped']
    assert (refused.ms_before < refused.ms_after).all() and refused.reason.str.contains('block not faster').all()
    x = torch.randn(1, 3, 16, 16)
    assert torch.isfinite(out(x)).all()


def test_learner_decompose_passes_min_speedup(monkeypatch):
    from fastai.learner import Learner
    from fasterai.data.digits import digits_dls, digits_cnn
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(fake_timer(lambda a, b: (1.0, 2.0))))
    learn = Learner(digits_dls(seed=0), digits_cnn(), loss_func=nn.CrossEntropyLoss())
    rep = learn.decompose(min_speedup=1.0, progress=False, n_batches=1)
    timed = rep[rep.ms_before.notna()]
    assert len(timed) and (timed.status == 'skipped').all()
    assert not any(isinstance(x, LowRankBlock) for x in learn.model.modules())


def test_budget_passes_min_speedup_and_says_what_it_cost(monkeypatch):
    from fasterai.decompose.budget import decompose
    m = cnn()
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(fake_timer(lambda a, b: (1.0, 2.0) if isinstance(a, nn.Conv2d) else (2.0, 1.0))))
    with pytest.warns(UserWarning, match='min_speedup left .* planned layer'):
        out = decompose(m, budget=0.5, input_shape=(1, 3, 16, 16), min_speedup=1.0, verbose=False)
    rep = decompose.report
    assert rep[rep.type == 'Conv2d'].reason.str.startswith('block not faster').any()
    assert not any(isinstance(x, LowRankConv) for x in out.modules())
    assert torch.isfinite(out(torch.randn(1, 3, 16, 16))).all()


@pytest.mark.never_slower
def test_default_is_never_slower_when_the_shape_is_known(monkeypatch):
    "min_speedup='auto' (the default): with input_shape= or data= a slower block is left dense, as with 1.0."
    m = cnn()
    timer = fake_timer(lambda a, b: (1.0, 2.0))                       # every block slower
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), verbose=False)
    assert not any(isinstance(x, LowRankBlock) for x in out.modules())
    assert d.report.reason.str.contains('min_speedup=1.0').sum() >= 2
    f = FC_Decomposer()
    out = f.decompose(m, percent_removed=0.75, data=[torch.randn(4, 3, 16, 16)], verbose=False)
    assert f.report.reason.str.startswith('block not faster').sum() >= 1 and not any(isinstance(x, LowRankBlock) for x in out.modules())
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(fake_timer(lambda a, b: (2.0, 1.0))))   # every block faster
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), verbose=False)
    assert (d.report.status == 'decomposed').sum() >= 2


@pytest.mark.never_slower
def test_default_without_a_shape_says_speed_was_not_checked(monkeypatch):
    m = cnn()
    timer = fake_timer(lambda a, b: (1.0, 2.0))
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    with pytest.warns(UserWarning, match='speed was not checked') as w:
        out = Conv_Decomposer().decompose(m, method='svd', percent_removed=0.75, verbose=False)
    assert sum('speed was not checked' in str(x.message) for x in w) == 1     # said once per call
    assert not timer.seen and any(isinstance(x, LowRankBlock) for x in out.modules())
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')                                      # min_speedup=None: nothing to say
        Conv_Decomposer().decompose(m, method='svd', percent_removed=0.75, min_speedup=None, verbose=False)


def test_never_slower_off_times_nothing(monkeypatch):
    "With core.NEVER_SLOWER = False (as in this suite), 'auto' times nothing, and says nothing."
    m = cnn()
    timer = fake_timer(lambda a, b: (1.0, 2.0))
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.75, input_shape=(1, 3, 16, 16), verbose=False)
    assert not timer.seen and (d.report.status == 'decomposed').sum() >= 2


@pytest.mark.parametrize('runtime', ['eager', 'onnxruntime'])
def test_blocks_are_timed_in_the_runtime_asked_for(monkeypatch, runtime):
    "`runtime=` reaches the timer of every layer, Conv and Linear, and through a budget too; 'eager' keeps the plain call."
    got = []
    def timer(a, b, x, **kwargs):
        got.append(kwargs.get('runtime', 'eager'))
        return 1.0, 0.5
    monkeypatch.setattr(Decomposer, 'timer', staticmethod(timer))
    Conv_Decomposer().decompose(cnn(), method='tucker', input_shape=(1, 3, 16, 16), min_speedup=1.0, runtime=runtime, verbose=False)
    n_conv = len(got)
    FC_Decomposer().decompose(cnn(), input_shape=(1, 3, 16, 16), min_speedup=1.0, runtime=runtime, verbose=False)
    assert n_conv >= 2 and len(got) > n_conv and set(got) == {runtime}
    got.clear()
    decompose(cnn(), budget=0.5, budget_on='params', input_shape=(1, 3, 16, 16), min_speedup=1.0, runtime=runtime, verbose=False)
    assert len(got) >= 2 and set(got) == {runtime}


def test_a_layer_and_its_block_time_in_onnxruntime():
    "The real timer in onnxruntime: both exported, both timed, positive milliseconds (which is faster is the machine's)."
    pytest.importorskip('onnxruntime')
    conv = nn.Conv2d(16, 32, 3, padding=1, padding_mode='reflect')
    block = Conv_Decomposer().decompose(nn.Sequential(conv), method='tucker', min_speedup=None, verbose=False)[0]
    a, b = time_pair(conv, block, torch.randn(1, 16, 12, 12), runtime='onnxruntime', min_time=0.01)
    assert a > 0 and b > 0


def test_runtime_is_checked():
    with pytest.raises(ValueError, match='runtime must be one of'):
        Conv_Decomposer().decompose(cnn(), input_shape=(1, 3, 16, 16), runtime='tvm')
    with pytest.raises(ValueError, match='runtime must be one of'):
        FC_Decomposer().decompose(cnn(), input_shape=(1, 3, 16, 16), runtime='ort')
