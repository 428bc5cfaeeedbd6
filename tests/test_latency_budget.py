"""`budget_on='latency'`, `method='auto'`, rank multiples and the end-to-end calibration, with a stand-in clock.

Timings are for benchmarks, not tests: here every time comes from a deterministic cost model (MACs plus a cost per
op), patched in where the library times things (`LatencyTable.ms`, `in_model_ms`, `model_ms`), so what is checked
is the logic: what is planned, how the plan is corrected when the model's time differs from the layers' sum, and
what the report and `latency` say."""
import warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose import budget as B, latency as L
from fasterai.decompose.blocks import LowRankBlock, block_macs, layer_macs
from fasterai.decompose.ranks import kernel_multiple

OP_MS = 0.002                   # per conv or Linear call
MS_PER_MMAC = 0.01


def leaf_ms(m, shape, block_factor=1.0, thin_ms=0.0):
    """Stand-in milliseconds of a conv, Linear or block at an input shape (batch included); `thin_ms` more for each
    conv of a block with one output channel."""
    if isinstance(m, LowRankBlock) or (isinstance(m, nn.Sequential) and len(m)):
        size = tuple(shape[2:])
        macs = block_macs(m, size) if not isinstance(m[0], nn.Linear) else sum(l.weight.numel() for l in m)
        thin = thin_ms * sum(isinstance(c, nn.Conv2d) and c.out_channels == 1 for c in m)
        return block_factor * (len(m) * OP_MS + MS_PER_MMAC * shape[0] * macs / 1e6) + thin
    macs = layer_macs(m, tuple(shape[2:])) if not isinstance(m, nn.Linear) else m.weight.numel()
    return OP_MS + MS_PER_MMAC * shape[0] * macs / 1e6


def model_time(model, x, block_factor=1.0, fixed=0.05, bn_ms=0.0, thin_ms=0.0):
    """Stand-in end-to-end milliseconds: every conv/Linear/block at the shape it sees, `bn_ms` per BatchNorm, plus a
    fixed cost."""
    fixed = fixed + bn_ms * sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    shapes, hooks = {}, []
    def top(m):
        return isinstance(m, (LowRankBlock, nn.Conv2d, nn.Linear))
    seen = set()
    for m in model.modules():
        if top(m) and id(m) not in seen:
            if isinstance(m, LowRankBlock): seen.update(id(c) for c in m.modules())
            hooks.append(m.register_forward_pre_hook(lambda mod, a: (shapes.setdefault(id(mod), (mod, tuple(a[0].shape))), None)[1]))
    with torch.inference_mode(): model(x)
    for h in hooks: h.remove()
    return fixed + sum(leaf_ms(m, s, block_factor if isinstance(m, LowRankBlock) else 1.0, thin_ms) for m, s in shapes.values())


@pytest.fixture
def clock(monkeypatch):
    "Patch the library's timers with the stand-in; `clock.factor` makes blocks slower in the model than alone."
    class Clock: factor, bn_ms, alone_ms, thin_ms = 1.0, 0.0, 0.0, 0.0
    c = Clock()
    def table_ms(self, modules, shapes, **timing):
        out = []
        for m, s in zip(modules, shapes):
            k = self.key(m, s)
            # `alone_ms`: what a block costs more timed alone than inside the model (its layer's scaling misses it)
            extra = c.alone_ms if isinstance(m, LowRankBlock) or (isinstance(m, nn.Sequential) and len(m)) else 0.0
            if k not in self.entries: self.entries[k] = leaf_ms(m, s, thin_ms=c.thin_ms) + extra; self.measured += 1
            out.append(self.entries[k])
        return out
    def fake_model_ms(models, x, runtime='eager', **timing):
        one = isinstance(models, nn.Module)
        ts = [model_time(m, x, c.factor, bn_ms=c.bn_ms, thin_ms=c.thin_ms) for m in ([models] if one else models)]
        return ts[0] if one else ts
    def fake_in_model_ms(model, x, layers, rounds=10):
        shapes = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: (shapes.setdefault(n, tuple(a[0].shape)), None)[1]) for n, m in layers.items()]
        with torch.inference_mode(): model(x)
        for h in hooks: h.remove()
        return {n: leaf_ms(layers[n], s) for n, s in shapes.items()}
    monkeypatch.setattr(L.LatencyTable, 'ms', table_ms)
    monkeypatch.setattr(B, 'model_ms', fake_model_ms)
    monkeypatch.setattr(B, 'in_model_ms', fake_in_model_ms)
    return c


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Conv2d(48, 96, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 128, 1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10)).eval()


SHAPE = (1, 3, 32, 32)


@pytest.mark.parametrize('method', ['tucker', 'auto'])
def test_latency_budget_lands_on_its_target(clock, method):
    m = cnn()
    d = Budget_Decomposer()
    out = d.decompose(m, budget=0.5, budget_on='latency', method=method, input_shape=SHAPE, verbose=False)
    lat = d.latency
    assert abs(lat['measured_share'] - 0.5) <= 0.05, lat
    assert lat['measured_ms'] == pytest.approx(model_time(out, torch.zeros(SHAPE)))
    rep = d.report
    done = rep[rep.status == 'decomposed']
    assert len(done) >= 2 and (done.ms_after < done.ms_before).all()
    assert not any(isinstance(x, LowRankBlock) for x in m.modules())          # the caller's model untouched


def test_auto_gives_the_1x1_conv_an_svd_block_and_each_layer_one_method(clock):
    m = cnn()
    d = Budget_Decomposer()
    out = d.decompose(m, budget=0.3, budget_on='latency', method='auto', input_shape=SHAPE, verbose=False)
    rep = d.report.set_index('name')
    assert rep.loc['6', 'method'] == 'svd'                                     # a 1×1 conv: SVD or dense only
    done = rep[rep.status == 'decomposed']
    assert set(done.method) <= {'tucker', 'svd', 'spatial', 'cp'}
    for n in done.index:                                                       # the block is of the method reported
        assert out.get_submodule(n).method == done.loc[n, 'method']
    # tucker alone cannot take the 1×1 conv: the same target leaves it dense
    t = Budget_Decomposer()
    t.decompose(m, budget=0.3, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    assert t.report.set_index('name').loc['6', 'status'] == 'skipped'


def test_calibration_corrects_a_plan_the_layers_mispredict(clock):
    "Blocks 1.6× slower inside the model than alone: the first plan lands above target, the calibrated one near it."
    clock.factor = 1.6
    m = cnn()
    d = Budget_Decomposer()
    d.decompose(m, budget=0.6, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    first, final = d.calibration[0]['measured'], d.latency['measured_share']
    assert len(d.calibration) >= 2 and first > 0.6 * 1.03
    assert abs(final - 0.6) < abs(first - 0.6) and abs(final - 0.6) <= 0.06
    u = Budget_Decomposer()                                                    # calibrate=0: the first plan as it is
    u.decompose(m, budget=0.6, budget_on='latency', method='tucker', input_shape=SHAPE, calibrate=0, verbose=False)
    assert u.calibration is None and u.latency['measured_share'] == pytest.approx(first, rel=1e-6)


def test_calibration_climbs_back_from_a_plan_the_layers_overpredict(clock):
    """Blocks timed alone cost 0.5 ms more than inside the model: the cheapest plan the layers predict (55% of the
    time) measures 21%, far under a 30% target. Every target below 55% gives that same plan, so the next one is aimed
    from the plan's own cost, and calibration lands near the target instead of keeping the overshoot."""
    clock.alone_ms = 0.5
    d = Budget_Decomposer()
    d.decompose(cnn(), budget=0.3, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    first, final = d.calibration[0], d.latency['measured_share']
    assert first['planned'] > 0.5 and first['measured'] < 0.3 * 0.8
    assert len(d.calibration) >= 2 and abs(final - 0.3) <= 0.1 * 0.3


def test_a_target_out_of_reach_is_warned_about(clock):
    m = cnn()
    with pytest.warns(UserWarning, match='out of reach'):
        Budget_Decomposer().decompose(m, budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)


def test_out_of_reach_keeps_a_plan_that_cuts_less_for_the_same_time(clock):
    """2% of the time is out of reach: the cheapest plan cuts every layer to rank 1. Calibration then keeps the plan
    of most rank that measures within KNEE_TOL of the fastest, and says so."""
    m = cnn()
    with pytest.warns(UserWarning, match='fastest plan found'):
        d = Budget_Decomposer()
        d.decompose(m, budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    fastest, final = d.latency['fastest_share'], d.latency['measured_share']
    assert fastest == min(c['measured'] for c in d.calibration)
    assert fastest <= final <= fastest * (1 + B.KNEE_TOL) + 1e-9
    done = d.report[d.report.status == 'decomposed']
    floor = [c for c in d.calibration if c['measured'] == fastest][0]['planned']
    assert d.plan['planned'] / d.plan['before'] > floor                        # more planned time: more rank kept
    assert any(max(r) > 1 for r in done.ranks)                                 # the floor plan: rank 1 everywhere
    # a reachable target is not touched by the rule
    u = Budget_Decomposer()
    u.decompose(m, budget=0.5, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    assert 'fastest_share' not in u.latency


@pytest.mark.parametrize('thin_ms', [0.0, 0.05])
def test_ranks_timed_no_faster_are_not_cut(clock, thin_ms):
    """A conv with one output channel costs 0.05 ms more: rank 1 is then timed slower than larger ranks, and even the
    cheapest plan (a target out of reach) keeps the larger ones. Without that cost rank 1 is the cheapest, and kept."""
    clock.thin_ms = thin_ms
    d = Budget_Decomposer()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = d.decompose(cnn(), budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    done = d.report[d.report.status == 'decomposed']
    assert len(done) >= 2
    widths = [c.out_channels for n in done.name for c in out.get_submodule(n).modules() if isinstance(c, nn.Conv2d)]
    assert (min(widths) > 1) == (thin_ms > 0), widths


@pytest.mark.parametrize('q', [8, 16])
def test_ranks_stay_on_the_multiple(clock, q):
    m = cnn()
    for on in ('latency', 'params'):
        d = Budget_Decomposer()
        d.decompose(m, budget=0.5, budget_on=on, method='tucker', input_shape=SHAPE, rank_multiple=q, verbose=False)
        done = d.report[d.report.status == 'decomposed']
        assert len(done)
        assert all(r < q or r % q == 0 for rs in done.ranks for r in rs), list(done.ranks)


def test_rank_multiple_auto_rounds_only_latency_budgets():
    assert B.check_rank_multiple('auto', 'params') == 1 and B.check_rank_multiple('auto', 'macs') == 1
    assert B.check_rank_multiple('auto', 'latency') == kernel_multiple()
    assert B.check_rank_multiple(4, 'params') == 4
    for bad in (0, 2.0, True, 'x'):
        with pytest.raises(ValueError, match="rank_multiple must be 'auto' or an int >= 1"):
            B.check_rank_multiple(bad, 'latency')


def test_the_latency_table_spares_a_second_call_its_timings(clock, tmp_path):
    m = cnn()
    path = tmp_path / 't.json'
    d = Budget_Decomposer()
    d.decompose(m, budget=0.5, budget_on='latency', method='auto', input_shape=SHAPE, latency_table=path, verbose=False)
    assert path.exists() and d.latency_table.measured > 0
    again = Budget_Decomposer()
    again.decompose(m, budget=0.5, budget_on='latency', method='auto', input_shape=SHAPE, latency_table=path, verbose=False)
    assert again.latency_table.measured == 0 and len(again.latency_table) == len(d.latency_table)


@pytest.mark.parametrize('on', ['params', 'macs'])
def test_auto_under_size_budgets(on):
    "method='auto' works under every budget_on: the target is met, and each decomposed layer got one of the methods."
    m = cnn()
    d = Budget_Decomposer()
    out = d.decompose(m, budget=0.4, budget_on=on, method='auto', input_shape=SHAPE, verbose=False)
    assert abs(d.plan['planned'] / d.plan['before'] - 0.4) < 0.02
    done = d.report[d.report.status == 'decomposed']
    assert len(done) >= 2 and set(done.method) <= set(B.AUTO_METHODS)
    x = torch.randn(2, 3, 32, 32)
    assert out(x).shape == m(x).shape


def test_a_plan_slower_than_dense_is_never_kept(clock):
    "Blocks 1000× slower inside the model than alone: every plan with a block measures above 1, so the model stays dense."
    clock.factor = 1000.0
    m = cnn()
    d = Budget_Decomposer()
    with pytest.warns(UserWarning, match='out of reach'):
        out = d.decompose(m, budget=0.6, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    assert all(c['measured'] > 1 or c['planned'] == pytest.approx(1) for c in d.calibration)
    assert not any(isinstance(x, LowRankBlock) for x in out.modules()) and d.latency['measured_share'] == pytest.approx(1)


def test_an_auto_plan_follows_its_layers_time_inside_the_model(clock):
    "AutoPlan.time_inside scales every method's curve and the dense cost the allocation compares them with."
    m = cnn()
    shape = (1, 48, 32, 32)
    calls = {'2': [shape]}
    timer = B.latency_timer(L.LatencyTable('eager'), calls)
    plans, _ = B.plan_layers(m, method='auto', on='latency', fc=False, layers=['2'], shapes={'2': shape}, calls=calls,
                             timer=timer)
    p = plans[0]
    assert isinstance(p, B.AutoPlan) and set(p.plans) == set(B.AUTO_METHODS)   # every method takes a 3×3 conv
    before = p.dense
    p.time_inside(2 * p.latency.alone_ms)
    assert p.dense == pytest.approx(2 * before)
    assert all(s.dense == pytest.approx(p.dense) for s in p.plans.values())


def cnn_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                      nn.Conv2d(48, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                      nn.Conv2d(96, 96, 3, padding=1, bias=False), nn.BatchNorm2d(96), nn.ReLU(),
                      nn.Conv2d(96, 128, 3, padding=1), nn.BatchNorm2d(128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(128, 10))
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.uniform_(-1, 1); b.running_var.uniform_(0.5, 2); b.weight.data.uniform_(0.5, 1.5)
    return m.eval()


def test_fold_bn_decomposes_the_folded_model_and_times_against_the_original(clock):
    "The BatchNorm layers' own time counts toward the budget, which stays a share of the model as the caller has it."
    from fasterai.misc.bn_folding import BN_Folder
    clock.bn_ms = 0.03
    m, x = cnn_bn(), torch.randn(SHAPE)
    d = Budget_Decomposer()
    out = d.decompose(m, budget=0.6, budget_on='latency', method='tucker', input_shape=SHAPE, fold_bn=True,
                      verbose=False)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in out.modules())
    assert sum(isinstance(b, nn.BatchNorm2d) for b in m.modules()) == 4               # the caller's model untouched
    assert int(d.folded.folded.sum()) == 4
    lat = d.latency
    assert lat['dense_ms'] == pytest.approx(model_time(m, x, bn_ms=0.03))             # the model with its BatchNorms
    assert lat['folded_dense_ms'] == pytest.approx(model_time(m, x, bn_ms=0.03) - 4 * 0.03)
    assert abs(lat['measured_share'] - 0.6) <= 0.06, lat
    # the same call without folding has to cut further to reach the same share
    d2 = Budget_Decomposer()
    d2.decompose(m, budget=0.6, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    kept = lambda r: sum(sum(k) for k in r[r.status == 'decomposed'].ranks)
    assert kept(d.report) > kept(d2.report)
    # and the result is the folded model's decomposition: the same call on BN_Folder's output gives the same model
    d3 = Budget_Decomposer()
    ref = d3.decompose(BN_Folder().fold(m, verbose=False), budget=0.6 / (lat['folded_dense_ms'] / lat['dense_ms']),
                       budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    with torch.no_grad(): assert torch.allclose(out(x), ref(x), atol=1e-5)


def test_fold_bn_alone_may_reach_the_budget(clock):
    clock.bn_ms = 0.5                                     # BatchNorms hold most of the time: folding is enough
    m = cnn_bn()
    d = Budget_Decomposer()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        out = d.decompose(m, budget=0.7, budget_on='latency', method='tucker', input_shape=SHAPE, fold_bn=True,
                          verbose=False)
    assert not any(isinstance(b, LowRankBlock) for b in out.modules())
    assert d.latency['measured_share'] <= 0.7
    assert not [w for w in rec if 'latency' in str(w.message)]            # faster than asked, nothing cut: no warning


def test_fold_bn_arguments(clock):
    m = cnn_bn()
    with pytest.raises(TypeError, match='fold_bn'):
        Budget_Decomposer().decompose(m, budget=0.5, fold_bn='yes', verbose=False)
    with pytest.raises(ValueError, match='fold_bn=True.*inplace'):
        Budget_Decomposer().decompose(m, budget=0.5, fold_bn=True, inplace=True, verbose=False)
    # a params budget with fold_bn: the folded model's decomposition at that budget
    from fasterai.misc.bn_folding import BN_Folder
    x = torch.randn(SHAPE)
    a = Budget_Decomposer().decompose(m, budget=0.5, fold_bn=True, verbose=False)
    ref = Budget_Decomposer().decompose(BN_Folder().fold(m, verbose=False), budget=0.5, verbose=False)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in a.modules())
    with torch.no_grad(): assert torch.allclose(a(x), ref(x), atol=1e-6)
    # with data= (whatever its batches hold) and no input_shape
    d = Budget_Decomposer()
    b = d.decompose(m, budget=0.5, fold_bn=True, data=[(torch.randn(4, 3, 32, 32), torch.zeros(4))], verbose=False)
    assert int(d.folded.folded.sum()) == 4 and not any(isinstance(l, nn.BatchNorm2d) for l in b.modules())


class _Plan:
    "A layer whose block costs 2 per rank against a dense cost of 10: ranks 5 and up are no cheaper than the layer."
    name, dense, full = 'a', 10.0, (8,)
    def cost(self, r): return 2.0 * r[0]
    def shrinks(self, r): return True
    def grow(self, r): return [((r[0] + 1,), 1.0)] if r[0] < self.full[0] else []


def test_fill_never_grows_a_block_to_cost_its_layer():
    "Spending what is left under the target stops before a block would cost as much as its layer."
    ranks, cost = B._fill([_Plan()], {'a': (2,)}, 4.0, target=100.0, tol=0.0)
    assert ranks == {'a': (4,)} and cost == 8.0



def test_a_missed_budget_says_how_much_time_it_may_not_cut(clock):
    "The warning and `latency['uncut_ms']` give the time outside the planned layers: the clock's fixed cost and the rest."
    m, d = cnn(), Budget_Decomposer()
    with pytest.warns(UserWarning, match=r'out of reach: about \d+% of the dense time') as w:
        d.decompose(m, budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    assert not any('fold_bn=True' in str(x.message) for x in w)                       # no BatchNorm to fold
    planned = set(d.report.name[d.report.ms_before.notna()])
    shapes = {}
    hooks = [l.register_forward_pre_hook(lambda mod, a, n=n: shapes.setdefault(n, tuple(a[0].shape)) and None)
             for n, l in m.named_modules() if n in planned]
    with torch.inference_mode(): m(torch.randn(SHAPE))
    for h in hooks: h.remove()
    dense = model_time(m, torch.randn(SHAPE))
    uncut = dense - sum(leaf_ms(m.get_submodule(n), s) for n, s in shapes.items())
    assert len(planned) >= 2 and uncut > 0.05
    assert d.latency['uncut_ms'] == pytest.approx(uncut, rel=1e-6)


def test_a_missed_budget_points_to_fold_bn_on_a_model_with_batchnorm(clock):
    m = cnn_bn()
    with pytest.warns(UserWarning, match=r'fold_bn=True folds the BatchNorm layers \(4 here\)'):
        Budget_Decomposer().decompose(m, budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, verbose=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        d = Budget_Decomposer()
        d.decompose(m, budget=0.02, budget_on='latency', method='tucker', input_shape=SHAPE, fold_bn=True, verbose=False)
    msgs = [str(x.message) for x in w]
    assert any('out of reach' in s for s in msgs) and not any('fold_bn=True folds' in s for s in msgs)
    assert 0 < d.latency['uncut_ms'] < d.latency['folded_dense_ms']

