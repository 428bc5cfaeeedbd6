"""Two CPU processes (gloo): the decomposers sum their statistics over the processes and build the same blocks on
both; `DecomposeCallback` under DDP and a plain DDP re-wrap end with identical weights on both processes."""
import os, socket, datetime
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def free_port() -> int:
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    return port


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def shards():
    """Two shards of 4 batches with different statistics (the second is scaled and shifted), so that per-process
    calibration gives different ranks and factors."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, 32, generator=g) * torch.linspace(0.1, 3, 32)
    xs = [torch.randn(16, 32, generator=g) @ base for _ in range(8)]
    return [xs[:4], [x * 2 + 1 for x in xs[4:]]]


def fc_energy(model, data):
    from fasterai.decompose.all import FC_Decomposer
    d = FC_Decomposer()
    return d.decompose(model, energy_threshold=0.9, data=data, n_batches=8, verbose=False), d.report


def budget(model, data, **kw):
    from fasterai.decompose.all import Budget_Decomposer
    d = Budget_Decomposer()
    return d.decompose(model, budget=0.5, data=data, n_batches=8, verbose=False, **kw), d.report


def ranks(report): return [(n, r) for n, r, s in zip(report.name, report.ranks, report.status) if s == 'decomposed']


def state(m): return {k: v.detach().clone() for k, v in m.state_dict().items()}


def digits_shard(rank, n_train=512, n_valid=128, bs=32):
    "fastai DataLoaders over this process's shard of the digits (8×8 images): equal sizes on every process."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fasterai.data.digits import digits_arrays
    xt, yt, xv, yv = digits_arrays(size=8)
    sl, sv = slice(rank * n_train, (rank + 1) * n_train), slice(rank * n_valid, (rank + 1) * n_valid)
    train = DataLoader(list(zip(xt[sl], yt[sl])), bs=bs, shuffle=True, drop_last=True)
    return DataLoaders(train, DataLoader(list(zip(xv[sv], yv[sv])), bs=bs), device='cpu')


def small_cnn():
    from fasterai.data.digits import digits_cnn
    torch.manual_seed(0)
    return digits_cnn(width=8, hidden=32)


def learner_run(rank):
    "`DecomposeCallback` at epoch 1 of 2 on a Learner whose model is wrapped in DDP for the fit (as fastai does)."
    from fastai.learner import Learner
    from fastai.callback.core import Callback
    from fasterai.decompose.all import DecomposeCallback, LowRankBlock

    class DDPCallback(Callback):
        "What fastai's `DistributedTrainer` does to the model, without Accelerate or a GPU."
        order = 11
        def before_fit(self): self.learn.model = nn.parallel.DistributedDataParallel(self.learn.model)
        def after_fit(self): self.learn.model = self.learn.model.module

    learn = Learner(digits_shard(rank), small_cnn(), loss_func=nn.CrossEntropyLoss(), cbs=DDPCallback())
    cb = DecomposeCallback(at_epoch=1, n_batches=2, percent_removed=0.5)
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-3, cbs=cb)
    assert not isinstance(learn.model, nn.parallel.DistributedDataParallel)
    assert any(isinstance(m, LowRankBlock) for m in learn.model.modules())
    return state(learn.model), ranks(learn.decompose_report)


def plain_ddp_run(rank):
    "Plain PyTorch: train a step under DDP, decompose the unwrapped module on every process, wrap again, train on."
    from fasterai.decompose.all import Conv_Decomposer
    dls = digits_shard(rank)
    batches = [b for _, b in zip(range(3), dls.train)]
    model = nn.parallel.DistributedDataParallel(small_cnn())
    def step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, y in batches:
            opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    step(model)
    new = Conv_Decomposer().decompose(model.module, data=[x for x, _ in batches], method='tucker', verbose=False)
    model = nn.parallel.DistributedDataParallel(new)              # new parameters: a new wrapper, a new optimizer
    step(model)
    # BatchNorm running stats follow each process's last batch; DDP sends rank 0's at the start of a forward
    with torch.no_grad(): model.eval()(batches[0][0])
    return state(model.module)


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fasterai.decompose import core
    core.NEVER_SLOWER = False                  # as tests/conftest.py does: the math, not this machine's timings
    dist.init_process_group('gloo', rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        from fasterai.decompose.distributed import collective, check_same
        data = shards()[rank]
        res = {}
        m, rep = fc_energy(mlp(), data); res['fc'] = (state(m), ranks(rep))
        m, rep = budget(mlp(), data, sensitivity=False); res['budget'] = (state(m), ranks(rep))
        # output Grams from random probes: the same on every process, not equal to one process's on the union
        m, rep = budget(mlp(), data); res['grams'] = (state(m), ranks(rep))
        res['learner'] = learner_run(rank)
        res['plain'] = plain_ddp_run(rank)
        torch.manual_seed(rank)                                        # a block that differs between processes
        try:
            with collective(): check_same([('odd', nn.Linear(3, 2))], 'test')
            res['check'] = 'no error'
        except RuntimeError as e: res['check'] = str(e)
        torch.save(res, os.path.join(out, f'{rank}.pt'))
    finally: dist.destroy_process_group()


def test_two_processes(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f'{r}.pt', weights_only=False) for r in range(WORLD)]
    union = shards()[0] + shards()[1]
    refs = dict(fc=fc_energy(mlp(), union), budget=budget(mlp(), union, sensitivity=False))
    for key in ('fc', 'budget', 'grams', 'learner'):
        (sd0, r0), (sd1, r1) = res[0][key], res[1][key]
        assert r0 == r1 and r0, key
        assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0), key
    sd0, sd1 = res[0]['plain'], res[1]['plain']
    assert any(k.endswith('.2.weight') for k in sd0)                  # decomposed: a block's third layer
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    # the statistics of the union of the shards: one process on both shards gives the same ranks and factors
    for key, (model, report) in refs.items():
        sd, r = res[0][key]
        assert r == ranks(report), key
        ref = model.state_dict()
        assert sd.keys() == ref.keys()
        for k in sd:
            err = ((sd[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item()
            assert err < 1e-4, (key, k, err)
    assert "process 1 built the block of 'odd' differently" in res[1]['check'] or \
           "process 1 built the block of 'odd' differently" in res[0]['check']
