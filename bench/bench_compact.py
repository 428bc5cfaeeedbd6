"""Latency of the compact low-rank Linear (`CompactLinear`) against the plain two-Linear block, on MiniLM-sized layers.

    .venv/bin/python bench/bench_compact.py [--repeats 50] [--threads 2]
For each (m, n, k) the dense Linear, the plain block and the compact block at the same rank k are timed alternately on
(tokens, n) inputs under `torch.inference_mode()`; medians over repeats, ratios from the same run -> bench/results/compact.json."""
import argparse, json, time, statistics
from pathlib import Path
import torch
from torch import nn
from fasterai.decompose.blocks import linear_block, compact_linear_block, n_params
from fasterai.decompose.factorize import lowrank

ap = argparse.ArgumentParser()
ap.add_argument('--repeats', type=int, default=50); ap.add_argument('--threads', type=int, default=2)
ap.add_argument('--tokens', type=int, nargs='+', default=[64, 2048])
args = ap.parse_args()
torch.manual_seed(0); torch.set_num_threads(args.threads)

def timeit(f, x):
    t0 = time.perf_counter(); f(x); return time.perf_counter() - t0

rows = []
with torch.inference_mode():
    for (m, n, k) in [(384, 384, 144), (384, 384, 192), (1536, 384, 230), (384, 1536, 230)]:
        lin = nn.Linear(n, m)
        A, B, _ = lowrank(lin.weight.detach(), k)
        mods = dict(dense=lin, plain=linear_block(lin, A, B), compact=compact_linear_block(lin, A, B))
        for T in args.tokens:
            x = torch.randn(T, n)
            for f in mods.values():
                for _ in range(3): f(x)
            times = {name: [] for name in mods}
            for r in range(args.repeats):
                for name in (list(mods) if r % 2 == 0 else list(mods)[::-1]): times[name].append(timeit(mods[name], x))
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append(dict(m=m, n=n, k=k, tokens=T, **{f'{name}_ms': 1e3 * v for name, v in med.items()},
                             params_plain=n_params(mods['plain']), params_compact=n_params(mods['compact']),
                             compact_over_plain=med['compact'] / med['plain'], compact_over_dense=med['compact'] / med['dense']))
print('| m×n, rank | tokens | dense ms | plain ms | compact ms | compact/plain | params plain → compact |\n|---|---|---|---|---|---|---|')
for r in rows:
    print(f"| {r['m']}×{r['n']}, {r['k']} | {r['tokens']} | {r['dense_ms']:.3f} | {r['plain_ms']:.3f} | {r['compact_ms']:.3f} | "
          f"{r['compact_over_plain']:.2f} | {r['params_plain']:,} → {r['params_compact']:,} |")
(Path(__file__).parent / 'results').mkdir(exist_ok=True)
(Path(__file__).parent / 'results' / 'compact.json').write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
