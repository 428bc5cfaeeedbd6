"""Layers factored side by side (`core.PARALLEL_LAYERS`, one intra-op thread per layer) against one after the other,
weights only, idle machine:

    .venv/bin/python bench/bench_side_by_side.py [--models vgg16_bn resnet50] [--methods tucker svd] [--repeats 3]

`Conv_Decomposer().decompose(model, method=M, min_speedup=None)` on torchvision models with random weights, 2 threads,
the two ways alternated in one process; medians. Writes bench/results/side_by_side.json."""
import argparse, json, statistics, sys, time, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--models', nargs='+', default=['vgg16_bn', 'resnet50'])
p.add_argument('--methods', nargs='+', default=['tucker', 'svd'])
p.add_argument('--repeats', type=int, default=3)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'side_by_side.json'))
ARGS = p.parse_args()
import torch, torchvision
torch.set_num_threads(ARGS.threads); warnings.simplefilter('ignore')
from fasterai.decompose import core
from fasterai.decompose.all import Conv_Decomposer
rows = []
for name in ARGS.models:
    m = getattr(torchvision.models, name)().eval()
    for meth in ARGS.methods:
        t = {True: [], False: []}
        for _ in range(ARGS.repeats):
            for par in (True, False):
                core.PARALLEL_LAYERS = par
                s = time.perf_counter()
                Conv_Decomposer().decompose(m, method=meth, min_speedup=None, verbose=False)
                t[par].append(time.perf_counter() - s)
        r = dict(model=name, method=meth, side_by_side_s=statistics.median(t[True]),
                 one_after_the_other_s=statistics.median(t[False]))
        rows.append(r)
        print(f"{name} {meth}: side by side {r['side_by_side_s']:.2f} s, one after the other {r['one_after_the_other_s']:.2f} s")
core.PARALLEL_LAYERS = True
Path(ARGS.out).write_text(json.dumps(dict(env=_env.env_info(), args=vars(ARGS), rows=rows), indent=1))
