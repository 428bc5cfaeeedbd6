"""The fine-tuning recipe after `learn.decompose()`, and the cost of `NuclearNormCallback`, on the digits CNN and xresnet18.

Run from the repository root:  .venv/bin/python bench/bench_finetune.py [--seeds 0 1 2] [--archs cnn xresnet18] [--threads 2]

Part 1, recipe. For each architecture and seed: train with fastai's `fit_one_cycle(5, 3e-3)` on scikit-learn's digits
(32×32, `fasterai.data.digits`), decompose with the defaults (`learn.decompose()`: Tucker 0.5 on the convs, SVD 0.5 on
the Linears, calibrated on 4 training batches, first and last layer dense), then fine-tune one epoch, once per setting:
`learn.fine_tune_decomposed()` (the recipe: peak training LR ÷ 10, and the weights from before when the validation loss
went up) and `fit_one_cycle(1, lr)` at fixed LRs. Every
setting starts from the same decomposed weights and the same seed. Reports validation accuracy and loss before and after,
and on how many seeds the loss went down. Validation is 360 images: one image is 0.28 points, so losses are compared.

Part 2, NuclearNormCallback cost. Seconds of one training epoch of xresnet18 (and the CNN): plain, with
`NuclearNormCallback(1e-4)` at the default `every=8`, and at `every=1` (a fresh SVD direction every step); the
epochs are run in turns and the median of `--epochs-timed` is kept. Writes bench/results/finetune.json.
"""
from __future__ import annotations
import argparse, json, statistics, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench')); import _env

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
p.add_argument('--archs', nargs='+', default=['cnn', 'xresnet18'])
p.add_argument('--lrs', type=float, nargs='+', default=[1e-3, 1e-4])
p.add_argument('--threads', type=int, default=2)
p.add_argument('--epochs-timed', type=int, default=3, help='timed epochs per NuclearNormCallback setting')
p.add_argument('--skip-recipe', action='store_true'); p.add_argument('--skip-nuclear', action='store_true')
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'finetune.json'))
ARGS = p.parse_args()
warnings.filterwarnings('ignore')
import torch
from torch import nn
torch.set_num_threads(ARGS.threads)
import fastai
from fastai.learner import Learner
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from fastai.callback.schedule import *
from fastai.vision.models.xresnet import xresnet18
from fasterai.data.digits import digits_dls, digits_cnn
from fasterai.decompose.learner import NuclearNormCallback

def make(arch, seed):
    set_seed(seed)
    model = digits_cnn() if arch == 'cnn' else xresnet18(c_in=1, n_out=10)
    return Learner(digits_dls(seed=seed), model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)

def quiet(learn): return learn.no_bar(), learn.no_logging()

def recipe_runs():
    runs = []
    for arch in ARGS.archs:
        for seed in ARGS.seeds:
            learn = make(arch, seed)
            with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(5, 3e-3)
            dense = learn.model
            dense_loss, dense_acc = map(float, learn.validate())
            state = {k: v.clone() for k, v in dense.state_dict().items()}
            for setting in ['recipe'] + [f'lr {lr:g}' for lr in ARGS.lrs]:
                dense.load_state_dict(state); learn.model = dense
                with learn.no_bar(), learn.no_logging(): learn.decompose(verbose=False)
                loss0, acc0 = map(float, learn.validate())
                set_seed(seed + 100)
                with learn.no_bar(), learn.no_logging():
                    if setting == 'recipe': ft = learn.fine_tune_decomposed(); lr = ft['lr']
                    else: lr = float(setting.split()[1]); learn.fit_one_cycle(1, lr); ft = {}
                loss1, acc1 = map(float, learn.validate())
                runs.append(dict(arch=arch, seed=seed, setting=setting, lr=lr, dense_acc=dense_acc, dense_loss=dense_loss,
                                 acc_before=acc0, loss_before=loss0, acc_after=acc1, loss_after=loss1,
                                 loss_after_fit=ft.get('valid_loss_after', loss1), kept=ft.get('kept', 'fine-tuned')))
                print(runs[-1], flush=True)
    return runs

def epoch_seconds():
    out = {}
    for arch in ARGS.archs:
        learn = make(arch, 0)
        settings = {'plain': [], 'nuclear every=8': [NuclearNormCallback(1e-4)], 'nuclear every=1': [NuclearNormCallback(1e-4, every=1)]}
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)                       # warm-up
        times = {k: [] for k in settings}
        for _ in range(ARGS.epochs_timed):
            for k, cbs in settings.items():
                t = time.perf_counter()
                with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cbs)
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[arch] = dict(seconds=times, median=med, ratio={k: med[k] / med['plain'] for k in med})
        print(arch, out[arch]['median'], out[arch]['ratio'], flush=True)
    return out

def main():
    env = _env.env_info(fastai=fastai.__version__)
    res = dict(env=env, args=vars(ARGS))
    if not ARGS.skip_recipe:
        runs = res['runs'] = recipe_runs()
        print('\n| model | fine-tuning | LR | median val. accuracy before → after | median val. loss before → after | seeds where the fit lowered the loss | weights kept |')
        print('|---|---|---|---|---|---|---|')
        for arch in ARGS.archs:
            for setting in dict.fromkeys(r['setting'] for r in runs):
                rs = [r for r in runs if r['arch'] == arch and r['setting'] == setting]
                med = lambda k: statistics.median(r[k] for r in rs)
                down = sum(r['loss_after_fit'] < r['loss_before'] for r in rs)
                kept = ', '.join(r['kept'] for r in rs)
                print(f"| {arch} | {setting} | {med('lr'):.2g} | {med('acc_before'):.4f} → {med('acc_after'):.4f} | "
                      f"{med('loss_before'):.4f} → {med('loss_after'):.4f} | {down} of {len(rs)} | {kept} |")
    if not ARGS.skip_nuclear:
        res['nuclear'] = epoch_seconds()
        print('\n| model | plain epoch (s) | NuclearNormCallback every=8 | every=1 |')
        print('|---|---|---|---|')
        for arch, r in res['nuclear'].items():
            print(f"| {arch} | {r['median']['plain']:.2f} | {r['median']['nuclear every=8']:.2f} s (×{r['ratio']['nuclear every=8']:.2f}) | "
                  f"{r['median']['nuclear every=1']:.2f} s (×{r['ratio']['nuclear every=1']:.2f}) |")
    res['env']['loadavg_end'] = __import__('os').getloadavg()
    Path(ARGS.out).write_text(json.dumps(res, indent=1))

if __name__ == '__main__': main()
