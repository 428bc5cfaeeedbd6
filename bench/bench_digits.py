"""Accuracy kept on the digits CNN before any fine-tuning: data-aware vs weight-only vs uniform, at the same size.

    .venv/bin/python bench/bench_digits.py
The trained CNN is cached in bench/_cache/ (git-ignored)."""
import json, time
from pathlib import Path
import torch
from torch import nn
from fasterai.data.digits import digits_arrays
from fasterai.demo import model_macs

def digits_tensors(): return digits_arrays(size=32, seed=0)

def _block(ni, nf): return [nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(inplace=True)]

def digits_cnn(w=32):
    "The 5-conv VGG-style CNN this benchmark was measured on (273k params, 28.7M MACs)."
    return nn.Sequential(*_block(1, w), *_block(w, w), nn.MaxPool2d(2), *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
                         *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * w, 256), nn.ReLU(inplace=True), nn.Linear(256, 10))
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose

torch.manual_seed(0); torch.set_num_threads(2)
CACHE = Path(__file__).parent / '_cache'; CACHE.mkdir(exist_ok=True)
xt, yt, xv, yv = digits_tensors()

def train():
    f = CACHE / 'digits_cnn.pt'
    model = digits_cnn()
    if f.exists(): model.load_state_dict(torch.load(f)); return model.eval()
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    n = len(xt); steps = 6 * (n // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n, (64,))
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    torch.save(model.state_dict(), f)
    return model.eval()

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
