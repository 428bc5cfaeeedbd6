"""Accuracy kept on the digits CNN before any fine-tuning: data-aware vs weight-only vs uniform, at the same size.

    .venv/bin/python bench/bench_digits.py
The trained CNN is cached in bench/_cache/ (git-ignored)."""
import json, time
from pathlib import Path
import torch
from torch import nn
from fasterai.data.digits import digits_arrays
from fasterai.demo import model_macs

import sys; sys.path.insert(0, str(Path(__file__).parent))
from _digits import digits_tensors, trained_cnn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose

torch.manual_seed(0); torch.set_num_threads(2)
xt, yt, xv, yv = digits_tensors()

def train(): return trained_cnn(xt, yt)

@torch.no_grad()
def acc(m): return (m.eval()(xv).argmax(1) == yv).float().mean().item()

model = train()
base = acc(model)
calib = xt[:512]
shape = (1, 1, 32, 32)
dense_p, dense_m = n_params(model), model_macs(model, shape)
rows = []
def record(label, m):
    rows.append(dict(setting=label, accuracy=acc(m), drop=100 * (base - acc(m)), params=n_params(m) / dense_p, macs=model_macs(m, shape) / dense_m))

for method in ('svd', 'tucker', 'spatial'):
    record(f'convs, 40% MACs, {method}, data-aware', decompose(model, budget=0.4, budget_on='macs', input_shape=shape, method=method, fc=False, data=calib, verbose=False))
    record(f'convs, 40% MACs, {method}, weight-only', decompose(model, budget=0.4, budget_on='macs', input_shape=shape, method=method, fc=False, verbose=False))
    record(f'convs+FC, 50% params, {method}, data-aware', decompose(model, budget=0.5, method=method, data=calib, verbose=False))
    record(f'convs+FC, 50% params, {method}, weight-only', decompose(model, budget=0.5, method=method, verbose=False))
for p in (0.5, 0.6):
    m = Conv_Decomposer().decompose(model, percent_removed=p, method='tucker', verbose=False)
    record(f'convs uniform percent_removed={p}, tucker, weight-only', m)
    m = Conv_Decomposer().decompose(model, percent_removed=p, method='tucker', data=calib, verbose=False)
    record(f'convs uniform percent_removed={p}, tucker, data-aware', m)

# A small calibration set: 4 or 16 images (3 draws each, mean drop). Raw Σ of a Linear then has rank ≤ 4 or 16 and its
# whitened spectrum claims that rank loses nothing; the Ledoit–Wolf shrinkage (shrinkage='auto', the default) does not.
few = []
for n in (4, 16):
    for sh in (0, 'auto'):
        for method in ('svd', 'tucker'):
            drops = []
            for seed in range(3):
                idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[:n]
                drops.append(100 * (base - acc(decompose(model, budget=0.5, method=method, data=xt[idx], shrinkage=sh, verbose=False))))
            few.append(dict(setting=f'convs+FC, 50% params, {method}, {n} calibration images, shrinkage={sh!r}', mean_drop=sum(drops) / 3, drops=drops))

print(f'dense accuracy {base:.4f}, params {dense_p:,}, MACs {dense_m:,}\n')
print(f'| setting | accuracy | drop (points) | params kept | MACs kept |\n|---|---|---|---|---|')
for r in rows: print(f"| {r['setting']} | {r['accuracy']:.4f} | {r['drop']:.2f} | {r['params']:.1%} | {r['macs']:.1%} |")
print(f'\n| few calibration images | mean drop (points, 3 draws) | drops |\n|---|---|---|')
for r in few: print(f"| {r['setting']} | {r['mean_drop']:.2f} | {', '.join(f'{d:.2f}' for d in r['drops'])} |")
(Path(__file__).parent / 'results').mkdir(exist_ok=True)
(Path(__file__).parent / 'results' / 'digits.json').write_text(json.dumps(dict(dense=base, rows=rows, few_images=few), indent=1))
