"""Does a short nuclear-norm-regularized training make the no-fine-tune drop smaller at the same size? (digits CNN, CPU)

Run from the repository root:  .venv/bin/python bench/bench_nuclear.py [--seeds 0 1 2] [--epochs 4] [--threads 2]

For each seed, the digits CNN of `fasterai.data.digits` (3 conv-BN-ReLU blocks, 227k params) is trained with fastai's
`fit_one_cycle(epochs, 3e-3)`, once plainly and once per `NuclearNormCallback` setting (absolute and relative penalty,
several weights, on the three convs). Each trained model is then decomposed, without any fine-tuning, at the same size
for every training setting:
  tucker p=0.5 / p=0.8: `Conv_Decomposer().decompose(model, percent_removed=p, method='tucker', exclude=['0'])`
                        (same ranks whatever the training, so the same params and MACs),
  budget MACs 40%:      `decompose(model, budget=0.4, budget_on='macs', method='tucker', fc=False, input_shape=(1, 1, 32, 32))`
                        (ranks allocated per model, total conv MACs fixed),
each weight-only and data-aware (`data=` 512 training images). Reports, per setting, the median over seeds of the dense
accuracy, of the accuracy after decomposing and of the drop (points of validation accuracy; 360 images, so one image is
0.28 points), the relative logit error against the dense model, and on how many seeds the drop is smaller than the plain
model's. Writes bench/results/nuclear.json.
"""
from __future__ import annotations
import argparse, json, os, platform, statistics, subprocess, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench')); import _env  # bench/_env.py: versions, machine, git state

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='training seeds (medians are over these)')
    p.add_argument('--epochs', type=int, default=4, help='epochs of fit_one_cycle')
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--settings', nargs='+', default=None, help='training settings to run (names as in the table; default all)')
    p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'nuclear.json'))
    return p.parse_args()

ARGS = parse_args()
warnings.filterwarnings('ignore', message='.*torch.jit.script.*', category=FutureWarning)   # raised by fastai's import on recent torch
import torch
from torch import nn
torch.set_num_threads(ARGS.threads)
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *
from fasterai.data.digits import digits_dls, digits_cnn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.demo import model_macs

CONVS = ['0', '4', '8']                      # the three convs of digits_cnn; each is followed by a BatchNorm
SHAPE = (1, 1, 32, 32)
# name -> NuclearNormCallback kwargs (None: plain training)
SETTINGS = {'plain': None,
            'abs 1e-3': dict(weight=1e-3, relative=False), 'abs 1e-2': dict(weight=1e-2, relative=False), 'abs 3e-2': dict(weight=3e-2, relative=False),
            'rel 1e-2': dict(weight=1e-2, relative=True), 'rel 3e-2': dict(weight=3e-2, relative=True), 'rel 1e-1': dict(weight=1e-1, relative=True)}
DECOMPS = {'tucker p=0.5': lambda m, data: Conv_Decomposer().decompose(m, percent_removed=0.5, method='tucker', exclude=['0'], data=data, verbose=False),
           'tucker p=0.8': lambda m, data: Conv_Decomposer().decompose(m, percent_removed=0.8, method='tucker', exclude=['0'], data=data, verbose=False),
           'budget MACs 40%': lambda m, data: decompose(m, budget=0.4, budget_on='macs', method='tucker', fc=False, input_shape=SHAPE, data=data, verbose=False)}

def env_info():
    import fastai
    return _env.env_info(fastai=fastai.__version__)

def train(seed: int, nuc: dict | None):
    "The digits CNN trained `ARGS.epochs` epochs from `seed`, with `NuclearNormCallback(**nuc)` on the convs unless `nuc` is None."
    set_seed(seed)
    learn = Learner(digits_dls(seed=0), digits_cnn(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    cbs = [] if nuc is None else [NuclearNormCallback(layers=CONVS, **nuc)]
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(ARGS.epochs, ARGS.lr, cbs=cbs)
    return learn.model.eval()

def energy_rank(W, e=0.9):
    "How many singular values of W (T × S·k²) hold a fraction `e` of its energy."
    s2 = torch.linalg.svdvals(W.detach().flatten(1)).pow(2)
    return int((s2.cumsum(0) / s2.sum() < e).sum()) + 1

def med(xs): return statistics.median(xs)

def main():
    t_start = time.perf_counter()
    env = env_info()
    print(f"# nuclear-norm training vs no-fine-tune drop — torch {env['torch']}, fastai {env['fastai']}, {env['torch_threads']} threads, "
          f"load avg {env['loadavg_start'][0]:.2f}, git {(env['git_head'] or '?')[:8]}{' (dirty)' if env['git_dirty'] else ''}, {env['time']}\n")
    dls = digits_dls(seed=0)
    xv = torch.cat([x for x, _ in dls.valid]).cpu(); yv = torch.cat([y for _, y in dls.valid]).cpu()
    calib = torch.cat([x for x, _ in dls.train])[:512].cpu()           # training images, for data-aware decomposition
    @torch.no_grad()
    def evaluate(m):
        out = m.eval()(xv)
        return (out.argmax(1) == yv).float().mean().item(), out
    settings = {k: v for k, v in SETTINGS.items() if ARGS.settings is None or k in ARGS.settings}
    if 'plain' not in settings: settings = {'plain': None, **settings}
    runs = []
    for seed in ARGS.seeds:
        for name, nuc in settings.items():
            t0 = time.perf_counter()
            model = train(seed, nuc).cpu()
            t_train = time.perf_counter() - t0
            acc, ref = evaluate(model)
            run = dict(setting=name, nuc=nuc, seed=seed, dense=acc, train_seconds=t_train,
                       energy_rank_90={c: energy_rank(model.get_submodule(c).weight) for c in CONVS}, decomposed={})
            for dname, fn in DECOMPS.items():
                for mode, data in (('weight-only', None), ('data-aware', calib)):
                    m = fn(model, data)
                    a, out = evaluate(m)
                    run['decomposed'][f'{dname}, {mode}'] = dict(accuracy=a, drop=100 * (acc - a), logit_error=((out - ref).norm() / ref.norm()).item(),
                                                                 params=n_params(m) / n_params(model), macs=model_macs(m, SHAPE) / model_macs(model, SHAPE))
            runs.append(run)
            d = run['decomposed']
            print(f"seed {seed} {name:9s} dense {acc:.4f} ({t_train:.0f} s) energy ranks {list(run['energy_rank_90'].values())}  drops: "
                  + ', '.join(f"{k} {v['drop']:.1f}" for k, v in d.items()), flush=True)
    # ---- summary: medians over seeds, and per-seed comparison with the plain model
    keys = list(runs[0]['decomposed'])
    by = lambda s: [r for r in runs if r['setting'] == s]
    plain = {r['seed']: r for r in by('plain')}
    summary = []
    for s in settings:
        rs = by(s)
        row = dict(setting=s, dense=med([r['dense'] for r in rs]),
                   energy_rank_90={c: med([r['energy_rank_90'][c] for r in rs]) for c in CONVS}, decomposed={})
        for k in keys:
            drops = [r['decomposed'][k]['drop'] for r in rs]
            row['decomposed'][k] = dict(drop=med(drops), drops=drops, accuracy=med([r['decomposed'][k]['accuracy'] for r in rs]), logit_error=med([r['decomposed'][k]['logit_error'] for r in rs]),
                                        macs=med([r['decomposed'][k]['macs'] for r in rs]), params=med([r['decomposed'][k]['params'] for r in rs]),
                                        better_than_plain=sum(r['decomposed'][k]['drop'] < plain[r['seed']]['decomposed'][k]['drop'] for r in rs),
                                        worse_than_plain=sum(r['decomposed'][k]['drop'] > plain[r['seed']]['decomposed'][k]['drop'] for r in rs))
        summary.append(row)
    n = len(ARGS.seeds)
    print(f'\nMedians over {n} seeds ({", ".join(map(str, ARGS.seeds))}). Drop: points of validation accuracy lost by decomposing, no fine-tuning '
          f'(360 images: 1 image = 0.28 points). Energy ranks: singular values holding 90% of each conv\'s energy (convs {", ".join(CONVS)}).\n')
    print('| training | dense acc | energy ranks | ' + ' | '.join(keys) + ' |')
    print('|---|---|---|' + '---|' * len(keys))
    for row in summary:
        er = '/'.join(f"{v:g}" for v in row['energy_rank_90'].values())
        print(f"| {row['setting']} | {row['dense']:.4f} | {er} | " + ' | '.join(f"{row['decomposed'][k]['drop']:.2f}" for k in keys) + ' |')
    print(f'\nAccuracy after decomposing, no fine-tuning (median; what the user is left with, since the penalty can cost dense accuracy):\n')
    print('| training | dense acc | ' + ' | '.join(keys) + ' |')
    print('|---|---|' + '---|' * len(keys))
    for row in summary:
        print(f"| {row['setting']} | {row['dense']:.4f} | " + ' | '.join(f"{row['decomposed'][k]['accuracy']:.4f}" for k in keys) + ' |')
    print(f'\nRelative logit error against the dense model (median), and on how many of the {n} seeds the drop is smaller / larger than the plain model\'s:\n')
    print('| training | ' + ' | '.join(keys) + ' |')
    print('|---|' + '---|' * len(keys))
    for row in summary:
        d = row['decomposed']
        print(f"| {row['setting']} | " + ' | '.join(f"{d[k]['logit_error']:.3f} ({d[k]['better_than_plain']}↓ {d[k]['worse_than_plain']}↑)" for k in keys) + ' |')
    print('\nSize kept (median params / MACs of the whole model): ' + '; '.join(
        f"{k} {summary[0]['decomposed'][k]['params']:.1%} / {summary[0]['decomposed'][k]['macs']:.1%}" for k in keys))
    env['loadavg_end'] = os.getloadavg()
    total = time.perf_counter() - t_start
    out = Path(ARGS.out); out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, args=vars(ARGS), convs=CONVS, decompositions=keys, summary=summary, runs=runs,
                                   total_seconds=total), indent=1, default=str))
    print(f"\nTotal {total:.0f} s; load avg at end {env['loadavg_end'][0]:.2f}; results in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")

if __name__ == '__main__':
    main()
