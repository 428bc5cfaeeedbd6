"""Layers factored side by side (`core.layer_workers`): the same blocks and report as one after the other, errors
raised in model order with the caller's model untouched, every thread count put back, timing on the caller's
threads, and no side-by-side work where a layer's block depends on the blocks before it."""
import pytest, torch
from torch import nn
from fasterai.decompose import core
from fasterai.decompose.all import Conv_Decomposer, FC_Decomposer
from helpers import snapshot, same


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(32, 40, 1),
                         nn.Conv2d(40, 32, (3, 1), stride=2), nn.Flatten(), nn.LazyLinear(10)).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48),
                         nn.Linear(48, 40)).eval()


@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial', 'cp'])
def test_side_by_side_gives_the_blocks_of_one_after_the_other(monkeypatch, two_threads, method):
    x = torch.randn(2, 3, 12, 12)
    assert core.layer_workers('cpu', [mod for mod in convnet() if isinstance(mod, nn.Conv2d)]) == 2
    res = {}
    for par in (True, False):
        monkeypatch.setattr(core, 'PARALLEL_LAYERS', par)
        # side by side each layer runs on one thread: the reference is one layer after the other on one thread
        torch.set_num_threads(2 if par else 1)
        m = convnet(); m(x)                                      # the LazyLinear gets its shape
        snap, d = snapshot(m), Conv_Decomposer()
        out = d.decompose(m, method=method, percent_removed=0.4, verbose=False)
        assert same(m, snap)                                     # the caller's model is untouched
        res[par] = (out, d.report.drop(columns=['seconds']))
    (a, ra), (b, rb) = res[True], res[False]
    assert (ra.fillna(-1).astype(str) == rb.fillna(-1).astype(str)).all().all()
    assert (ra.status == 'decomposed').sum() >= (3 if method in ('tucker', 'svd') else 1)
    with torch.no_grad(): assert torch.equal(a(x), b(x))        # bit-identical: one thread per layer either way


def test_side_by_side_linears_match(monkeypatch, two_threads):
    res = {}
    for par in (True, False):
        monkeypatch.setattr(core, 'PARALLEL_LAYERS', par)
        torch.set_num_threads(2 if par else 1)
        d = FC_Decomposer()
        res[par] = (d.decompose(mlp(), percent_removed=0.5, verbose=False), d.report.drop(columns=['seconds']))
    x = torch.randn(5, 48)
    with torch.no_grad(): assert torch.equal(res[True][0](x), res[False][0](x))
    assert (res[True][1].fillna(-1).astype(str) == res[False][1].fillna(-1).astype(str)).all().all()


def test_thread_counts_come_back(monkeypatch, two_threads):
    Conv_Decomposer().decompose(convnet(), method='tucker', verbose=False)
    assert torch.get_num_threads() == 2


def test_who_works_side_by_side(monkeypatch, two_threads):
    convs = [nn.Conv2d(16, 16, 3) for _ in range(3)]
    assert core.layer_workers('cpu', convs) == 2
    assert core.layer_workers('meta', convs) == 1                 # only CPU work is shared out
    assert core.layer_workers('cpu', convs[:1]) == 1
    # one layer with half the work or more would run on one thread while the others wait
    assert core.layer_workers('cpu', [nn.Conv2d(256, 256, 3), *convs]) == 1
    monkeypatch.setattr(core, 'PARALLEL_LAYERS', False)
    assert core.layer_workers('cpu', convs) == 1
    monkeypatch.setattr(core, 'PARALLEL_LAYERS', True)
    torch.set_num_threads(1)
    assert core.layer_workers('cpu', convs) == 1


def test_an_error_in_one_layer_is_raised_and_nothing_is_lost(monkeypatch, two_threads):
    m = convnet(); m(torch.randn(1, 3, 12, 12))
    snap, d = snapshot(m), Conv_Decomposer()
    real = Conv_Decomposer.plan_layer
    def plan(self, name, conv, in_shape, work):
        if name in ('2', '6'): raise RuntimeError(f'boom {name}')
        return real(self, name, conv, in_shape, work)
    monkeypatch.setattr(Conv_Decomposer, 'plan_layer', plan)
    with pytest.raises(RuntimeError, match='boom 2'):            # the first in model order
        d.decompose(m, method='tucker', verbose=False, inplace=True)
    assert same(m, snap)
    assert torch.get_num_threads() == 2
    try:
        from threadpoolctl import threadpool_info
        before = {i['filepath']: i['num_threads'] for i in threadpool_info()}
    except ImportError: return
    monkeypatch.setattr(Conv_Decomposer, 'plan_layer', real)
    d.decompose(m, method='tucker', verbose=False)
    assert {i['filepath']: i['num_threads'] for i in threadpool_info()} == before


def test_blocks_are_timed_on_the_callers_threads(monkeypatch, two_threads):
    "Factoring happens on one thread per layer; the never-slower timing sees the thread count the caller set."
    seen, calls = [], []
    def timer(layer, block, x):
        seen.append(torch.get_num_threads()); return 2.0, 1.0
    real = Conv_Decomposer.plan_layer
    def plan(self, name, conv, in_shape, work):
        calls.append(torch.get_num_threads()); return real(self, name, conv, in_shape, work)
    monkeypatch.setattr(Conv_Decomposer, 'plan_layer', plan)
    monkeypatch.setattr(core, 'machine_busy', lambda: False)
    d = Conv_Decomposer(); d.timer = timer
    m = convnet()
    d.decompose(m, method='tucker', input_shape=(1, 3, 12, 12), min_speedup=1.0, verbose=False)
    assert calls and set(calls) == {1} and seen and set(seen) == {2}


def test_data_with_sequential_statistics_is_not_factored_side_by_side(monkeypatch, two_threads):
    "With `data=` and sequential statistics each layer's fit reads the blocks before it: one after the other."
    threads = []
    real = Conv_Decomposer.plan_layer
    def plan(self, name, conv, in_shape, work):
        threads.append(torch.get_num_threads()); return real(self, name, conv, in_shape, work)
    monkeypatch.setattr(Conv_Decomposer, 'plan_layer', plan)
    monkeypatch.setattr(core, 'machine_busy', lambda: False)
    data = [(torch.randn(4, 3, 12, 12), torch.zeros(4)) for _ in range(2)]
    d = Conv_Decomposer()
    d.decompose(convnet(), method='tucker', data=data, n_batches=2, verbose=False)
    assert not d.independent and set(threads) == {2}
    threads.clear()
    d.decompose(convnet(), method='tucker', data=data, n_batches=2, sequential=False, verbose=False)
    assert d.independent and set(threads) == {1}
