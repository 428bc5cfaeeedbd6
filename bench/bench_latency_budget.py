"""Speed bought per MAC removed: the default Tucker cut, budget_on='latency', and method='auto', end to end.

Run from the repository root:
    .venv/bin/python bench/bench_latency_budget.py [--models resnet18 resnet50 ...] [--batches 1 8]
                                                   [--runtimes eager onnxruntime] [--configs a b c] [--budget 0.5]

For each torchvision model (weights=None, eval, 3×224×224), batch size and runtime:
  (a) `Conv_Decomposer().decompose(model, method='tucker', percent_removed=0.5, input_shape=...)`: the default call
      (its default `min_speedup='auto'` times each block in eager mode at this shape and leaves slower ones dense);
  (b) `decompose(model, budget=B, budget_on='latency', method='tucker', input_shape=..., runtime=R)`;
  (c) the same with `method='auto'` (Tucker-2, channel SVD or dense per layer).
With `--fold-bn`, (b) and (c) pass `fold_bn=True`: every BatchNorm is folded into the conv before it first, and the
budget stays a share of the unfolded dense model's time (the folded dense model's share is in the row).
With `--a-in-runtime`, onnxruntime rows add (a) with `runtime='onnxruntime'`: the default call, its blocks timed in
onnxruntime (exported layer and block) instead of eager mode.
Dense and decomposed models are timed in one process, interleaved (`fasterai.decompose.latency.model_ms`: fastest of
rounds, repeated until stable), in runtime R. Reported: the MAC ratio (dense / decomposed, torch's FLOP counter via
`fasterai.demo.model_macs`), the speed ratio (dense ms / decomposed ms), the share of the MAC ratio reached (speed
ratio / MAC ratio), the decomposition's wall time, and for (b) and (c) the measured share of the dense latency
against the target. Eager rows also give the speed-up of the dense model with every conv weight in channels_last
(`dense_channels_last_speed_ratio`): the part of a decomposed model's speed-up the memory layout alone could give. One latency table per runtime is shared by every call (as a user passing `latency_table=` would).
Rows are appended to the output JSON as they come (`--out`, default bench/results/latency_budget.json).
"""
from __future__ import annotations
import argparse, copy, json, sys, time, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
import _env

MODELS = ['resnet18', 'resnet50', 'vgg16_bn', 'mobilenet_v2', 'mobilenet_v3_large', 'efficientnet_b0', 'convnext_tiny',
          'regnet_y_400mf']
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--models', nargs='+', default=MODELS)
p.add_argument('--batches', type=int, nargs='+', default=[1, 8])
p.add_argument('--runtimes', nargs='+', default=['eager', 'onnxruntime'])
p.add_argument('--configs', nargs='+', default=['a', 'b', 'c'])
p.add_argument('--budget', type=float, default=0.5)
p.add_argument('--threads', type=int, default=2)
p.add_argument('--fold-bn', action='store_true', help='(b) and (c) with fold_bn=True (BatchNorms folded first)')
p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'latency_budget.json'))
p.add_argument('--append', action='store_true', help='add rows to the rows already in --out')
p.add_argument('--a-in-runtime', action='store_true', help="(a) in onnxruntime with runtime='onnxruntime' (its blocks timed there)")
ARGS = p.parse_args()

import torch, torchvision
torch.set_num_threads(ARGS.threads)
warnings.simplefilter('ignore')
from fasterai.decompose.all import *
from fasterai.decompose.latency import model_ms, channels_last_convs
from fasterai.demo import model_macs

out = Path(ARGS.out)
old = json.loads(out.read_text()).get('rows', []) if ARGS.append and out.exists() else []
doc = dict(env=_env.env_info(torchvision=torchvision.__version__), args=vars(ARGS), rows=old)
tables = {rt: LatencyTable(rt) for rt in ARGS.runtimes}

def save(): out.write_text(json.dumps(doc, indent=1))

for name in ARGS.models:
    dense = getattr(torchvision.models, name)().eval()
    for bs in ARGS.batches:
        x = torch.randn(bs, 3, 224, 224)
        md = model_macs(dense, tuple(x.shape))
        a = ta = None
        if 'a' in ARGS.configs:                      # runtime-independent: made once per batch
            t = time.time()
            ca = Conv_Decomposer()
            a = ca.decompose(dense, method='tucker', percent_removed=0.5, input_shape=tuple(x.shape), verbose=False)
            ta = time.time() - t
        for rt in ARGS.runtimes:
            models = {'(a) tucker 0.5 (default)': (a, ta, None, ca.report)} if a is not None else {}
            if a is not None and ARGS.a_in_runtime and rt != 'eager':    # the default, its blocks timed in `rt`
                t = time.time()
                cr = Conv_Decomposer()
                ar = cr.decompose(dense, method='tucker', percent_removed=0.5, input_shape=tuple(x.shape), runtime=rt,
                                  verbose=False)
                models[f'(a) tucker 0.5, runtime={rt!r}'] = (ar, time.time() - t, None, cr.report)
            for c, meth in (('b', 'tucker'), ('c', 'auto')):
                if c not in ARGS.configs: continue
                d, t = Budget_Decomposer(), time.time()
                m = d.decompose(dense, budget=ARGS.budget, budget_on='latency', method=meth, input_shape=tuple(x.shape),
                                runtime=rt, latency_table=tables[rt], verbose=False, fold_bn=ARGS.fold_bn)
                models[f'({c}) latency {ARGS.budget}, {meth}' + (', fold_bn' if ARGS.fold_bn else '')] = (m, time.time() - t, d, d.report)
            # the dense model with every conv weight channels-last: how much of a speed-up the layout alone gives
            extra = [channels_last_convs(copy.deepcopy(dense))] if rt == 'eager' else []
            t_all = model_ms([dense] + extra + [v[0] for v in models.values()], x, rt, min_time=0.5)
            layout_only = t_all[0] / t_all[1] if extra else None
            times = [t_all[0]] + t_all[1 + len(extra):]
            for (cfg, (m, secs, d, rep)), ms in zip(models.items(), times[1:]):
                mc = model_macs(m, tuple(x.shape))
                r = dict(model=name, batch=bs, runtime=rt, config=cfg, dense_ms=times[0], ms=ms, mac_ratio=md / mc,
                         speed_ratio=times[0] / ms, share_of_mac_ratio=(times[0] / ms) / (md / mc), decompose_s=secs,
                         dense_channels_last_speed_ratio=layout_only)
                if d is not None:
                    r.update(target_share=ARGS.budget, measured_share=ms / times[0],
                             measured_share_in_call=d.latency['measured_share'], calibration=d.calibration)
                    if 'uncut_ms' in d.latency:            # the time in what no plan can change, as the call measured it
                        r['uncut_share_in_call'] = d.latency['uncut_ms'] / d.latency['dense_ms']
                    if 'folded_dense_ms' in d.latency:     # the dense model with its BatchNorms folded, in the call
                        r['folded_dense_share_in_call'] = d.latency['folded_dense_ms'] / d.latency['dense_ms']
                r['decomposed'] = int((rep.status == 'decomposed').sum())
                r['methods'] = {str(k): int(v) for k, v in rep[rep.status == 'decomposed'].method.value_counts().items()}
                doc['rows'].append(r); save()
                tgt = f"  latency {100 * ms / times[0]:.0f}% (target {100 * ARGS.budget:.0f}%)" if d is not None else ''
                if 'uncut_share_in_call' in r: tgt += f", {100 * r['uncut_share_in_call']:.0f}% uncuttable"
                print(f"{name:18s} b{bs} {rt:11s} {cfg:28s} MACs ÷{md / mc:.2f}  speed ×{times[0] / ms:.2f}  "
                      f"share {100 * (times[0] / ms) / (md / mc):.0f}%{tgt}  ({times[0]:.1f} → {ms:.1f} ms; "
                      f"decompose {secs:.0f} s)", flush=True)
save()
