"""What two CPU processes (gloo) build when each decomposes the same MLP with its own shard as `data=`.

    .venv/bin/python bench/dist_check.py

For `FC_Decomposer(energy_threshold=0.9)` and `Budget_Decomposer(budget=0.5)` it prints each process's ranks, whether
the state_dicts have the same shapes, their largest difference, and what wrapping the result in
`DistributedDataParallel` did. Before issue 19 (f83ebbb): FC ranks (15, 19, 6) against (16, 20, 6); the budget's
ranks agreed but its factors differed by up to 3.1; DDP over the FC results hung (no result in 300 s). After: the same
ranks and a difference of 0.0 for both."""
import os, sys, socket, torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from fasterai.decompose.all import *

def free_port():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

def shards():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(32, 32, generator=g)
    xs = [torch.randn(16, 32, generator=g) @ (base * torch.linspace(0.1, 3, 32)) for _ in range(8)]
    return [xs[0:4], [x * 2 + 1 for x in xs[4:8]]]       # two different shards

def work(rank, world, port, q):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    out = {}
    for what, kw in [('fc energy', dict(energy_threshold=0.9)), ('budget', dict())]:
        try:
            if what == 'budget': d = Budget_Decomposer(); m = d.decompose(model(), budget=0.5, data=shards()[rank], verbose=False)
            else: d = FC_Decomposer(); m = d.decompose(model(), data=shards()[rank], verbose=False, **kw)
            sd = {k: v.clone() for k, v in m.state_dict().items()}
            try: nn.parallel.DistributedDataParallel(m); ddp = 'DDP ok'
            except Exception as e: ddp = 'DDP: ' + str(e).splitlines()[0][:200]
            out[what] = ({k: tuple(v.shape) for k, v in sd.items()}, sd, d.report[['name', 'ranks']].values.tolist(), ddp)
        except Exception as e: out[what] = repr(e)
    torch.save(out, f'/tmp/dist_before_{rank}.pt'); q.put(rank)
    dist.destroy_process_group()

if __name__ == '__main__':
    ctx = mp.get_context('spawn'); q = ctx.Queue()
    port = free_port()
    ps = [ctx.Process(target=work, args=(r, 2, port, q)) for r in range(2)]
    for p in ps: p.start()
    [q.get(timeout=300) for _ in ps]
    for p in ps: p.join()
    res = {r: torch.load(f'/tmp/dist_before_{r}.pt', weights_only=False) for r in range(2)}
    for what in res[0]:
        a, b = res[0][what], res[1][what]
        if isinstance(a, str) or isinstance(b, str): print(what, a, b); continue
        print(what, 'ranks rank0', a[2], 'rank1', b[2], a[3], b[3])
        same_shapes = a[0] == b[0]
        print('  same shapes', same_shapes)
        if same_shapes:
            print('  max |diff| of state_dicts', max(float((a[1][k] - b[1][k]).abs().max()) for k in a[1]))
