"""Issue 17, item 2: should `method='auto'` also offer the spatial block (k×1 then 1×k)?

Run from the repository root:
    .venv/bin/python bench/bench_auto_spatial.py [--out bench/results/auto_spatial.json]

Trained models only (a random weight's spectra are flat, so which block "wins" on it says nothing): the digits CNN of
bench_digits.py (5 convs, width 32, cached in bench/_cache) and a second one trained here (width 16, another seed).
For each, a MACs budget of 0.5, 0.3 and 0.2 over the convs (`fc=False`), `method='auto'` with the block types
`('tucker', 'svd')` and `('tucker', 'svd', 'spatial')`, weight-only (no data) and with 512 calibration images
(data-aware: Tucker-2 and SVD spectra whitened, spatial's not); validation accuracy without fine-tuning, and which
blocks were chosen. The library's 'auto' weighs all three without data and Tucker-2 and SVD with data
(`auto_methods`); here both sets are forced in both cases.
Accuracy only: no timing, so the numbers do not depend on the machine's load.
"""
import argparse, json, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import _env
p = argparse.ArgumentParser()
p.add_argument('--out', default='bench/results/auto_spatial.json')
p.add_argument('--budgets', type=float, nargs='+', default=[0.5, 0.3, 0.2])
ARGS = p.parse_args()

import torch
from torch import nn
torch.set_num_threads(1)
warnings.simplefilter('ignore')
from _digits import digits_tensors, trained_cnn, digits_cnn
from fasterai.decompose.all import *
from fasterai.decompose import budget as B

xt, yt, xv, yv = digits_tensors()

def acc(model):
    with torch.no_grad(): return (model(xv).argmax(1) == yv).float().mean().item()

def train(model, seed, epochs=6, lr=3e-3):
    "AdamW one-cycle, as `trained_cnn`, with its own seed."
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    n = len(xt); steps = epochs * (n // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return model.eval()

torch.manual_seed(1)
models = {'digits_cnn w32 (bench_digits)': trained_cnn(xt, yt), 'digits_cnn w16 seed 1': train(digits_cnn(16), seed=1)}
calib = [xt[i:i + 64] for i in range(0, 512, 64)]
doc = dict(env=_env.env_info(), args=vars(ARGS), rows=[])
default = B.AUTO_METHODS, B.WHITENED_METHODS
for mname, m in models.items():
    print(f'{mname}: dense accuracy {acc(m):.4f}', flush=True)
    for data in (None, calib):
        for budget in ARGS.budgets:
            for meths in (('tucker', 'svd'), ('tucker', 'svd', 'spatial')):
                B.AUTO_METHODS = B.WHITENED_METHODS = meths      # the set under test, with or without data
                try:
                    d, t = Budget_Decomposer(), time.time()
                    kw = dict(data=data) if data is not None else dict(input_shape=(1, 1, 32, 32))
                    out = d.decompose(m, budget=budget, budget_on='macs', method='auto', fc=False, verbose=False, **kw)
                finally: B.AUTO_METHODS, B.WHITENED_METHODS = default
                dec = d.report[d.report.status == 'decomposed']
                r = dict(model=mname, data=data is not None, budget=budget, methods=list(meths), accuracy=acc(out),
                         dense_accuracy=acc(m), chosen=dec.method.value_counts().to_dict(), seconds=time.time() - t)
                doc['rows'].append(r)
                print(f"  {'data' if data is not None else 'weights':7s} MACs {budget:.1f} {'+'.join(meths):20s} "
                      f"accuracy {r['accuracy']:.4f}  {r['chosen']}", flush=True)
Path(ARGS.out).write_text(json.dumps(doc, indent=1))
