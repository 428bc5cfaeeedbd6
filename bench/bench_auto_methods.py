"""Issue 17, item 2: which block types should `method='auto'` weigh, and what does weighing CP cost?

Run from the repository root:
    .venv/bin/python bench/bench_auto_methods.py [--out bench/results/auto_methods.json]            # accuracy (1 thread)
    .venv/bin/python bench/bench_auto_methods.py --cost [--out bench/results/auto_methods_cost.json]  # seconds (2 threads, idle)

Accuracy (no timing, so the numbers do not depend on the machine's load): trained models only (a random weight's
spectra are flat, so which block "wins" on it says nothing): the digits CNN of bench_digits.py (5 convs, width 32,
cached in bench/_cache) and a second one trained here (width 16, another seed). For each, a MACs budget of 0.5, 0.3
and 0.2 over the convs (`fc=False`), method `('tucker', 'svd')`, `('tucker', 'svd', 'spatial')` and `'auto'` (all
four: with CP), weight-only (no data) and with 512 calibration images (data-aware: every method weighed on its output
error); validation accuracy without fine-tuning, and which blocks were chosen.

Cost (`--cost`, 2 threads): the CP error curves of a random resnet18's 3×3 convs (`cp_residuals` warm-started, the
default, against every rank fitted from scratch: seconds and the largest difference in residual share), and the
seconds of `decompose(budget=0.4)` (params) with 'auto' against `('tucker', 'svd', 'spatial')` on resnet18 and
vgg16_bn (random weights).
"""
import argparse, json, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
import _env
p = argparse.ArgumentParser()
p.add_argument('--out', default=None)
p.add_argument('--budgets', type=float, nargs='+', default=[0.5, 0.3, 0.2])
p.add_argument('--cost', action='store_true', help='the seconds CP adds (2 threads) instead of the accuracy grid')
ARGS = p.parse_args()
out_path = ARGS.out or ('bench/results/auto_methods_cost.json' if ARGS.cost else 'bench/results/auto_methods.json')

import torch
from torch import nn
warnings.simplefilter('ignore')
from fasterai.decompose.all import *
doc = dict(env=_env.env_info(), args=vars(ARGS), rows=[])

if ARGS.cost:
    import torchvision
    from fasterai.decompose.factorize import cp_residuals, curve_ranks
    from fasterai.decompose.ranks import curve_cap
    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = torchvision.models.resnet18().eval()
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1)]
    curves = {}
    for warm in ('default', None):
        t, res = time.time(), []
        for c in convs:
            rs = curve_ranks(curve_cap(c, 'cp'))
            tot = float(c.weight.detach().double().pow(2).sum())
            res.append([x / tot for x in (cp_residuals(c.weight, rs) if warm else cp_residuals(c.weight, rs, warm=None))])
        curves[warm] = (time.time() - t, res)
        print(f'CP curves of resnet18 3×3 convs, {"warm-started" if warm else "from scratch"}: {curves[warm][0]:.1f} s', flush=True)
    diff = max(abs(a - b) for ra, rb in zip(curves['default'][1], curves[None][1]) for a, b in zip(ra, rb))
    doc['curves'] = dict(warm_s=curves['default'][0], cold_s=curves[None][0], max_share_diff=diff)
    print(f'  largest difference in residual share: {diff:.4f}', flush=True)
    for name in ('resnet18', 'vgg16_bn'):
        model = getattr(torchvision.models, name)().eval()
        for meth in (('tucker', 'svd', 'spatial'), 'auto'):
            d, t = Budget_Decomposer(), time.time()
            d.decompose(model, budget=0.4, method=meth, verbose=False)
            r = dict(model=name, method=meth if isinstance(meth, str) else list(meth), seconds=time.time() - t,
                     chosen=d.report[d.report.status == 'decomposed'].method.value_counts().to_dict())
            doc['rows'].append(r)
            print(f"{name} params 0.4 {str(meth):30s} {r['seconds']:.1f} s  {r['chosen']}", flush=True)
    Path(out_path).write_text(json.dumps(doc, indent=1))
    sys.exit()

torch.set_num_threads(1)
from _digits import digits_tensors, trained_cnn, digits_cnn
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
for mname, m in models.items():
    print(f'{mname}: dense accuracy {acc(m):.4f}', flush=True)
    for data in (None, calib):
        for budget in ARGS.budgets:
            for meths in (('tucker', 'svd'), ('tucker', 'svd', 'spatial'), 'auto'):
                d, t = Budget_Decomposer(), time.time()
                kw = dict(data=data) if data is not None else dict(input_shape=(1, 1, 32, 32))
                out = d.decompose(m, budget=budget, budget_on='macs', method=meths, fc=False, verbose=False, **kw)
                dec = d.report[d.report.status == 'decomposed']
                r = dict(model=mname, data=data is not None, budget=budget, methods=meths if isinstance(meths, str) else list(meths),
                         accuracy=acc(out), dense_accuracy=acc(m), chosen=dec.method.value_counts().to_dict(),
                         seconds=time.time() - t)
                doc['rows'].append(r)
                print(f"  {'data' if data is not None else 'weights':7s} MACs {budget:.1f} {str(meths):28s} "
                      f"accuracy {r['accuracy']:.4f}  {r['chosen']}  {r['seconds']:.1f} s", flush=True)
Path(out_path).write_text(json.dumps(doc, indent=1))
