"""CPU inference latency, dense vs decomposed, for fasterai.decompose.

Run from the repository root:  .venv/bin/python bench/bench_latency.py [--repeats 25] [--threads 2] [--batches 1 8]

torchvision resnet18 (weights=None, eval) at 3×224×224, batch 1 and 8, each conv method of `Conv_Decomposer` at
percent_removed=0.5 (tucker, svd, spatial on every eligible conv; cp on layer1+layer2 only, because CP-ALS takes minutes
per large layer; tucker on the same subset is measured too, for comparison). Dense and decomposed forward passes are
timed alternately (ABBA order) under torch.inference_mode after a warm-up; the median of each is reported, and
speedup = median dense / median decomposed. Params and MACs come from `decomposer.report` (input_shape=(1,3,224,224));
whole-model MACs (every Conv and Linear, batch 1) from forward hooks. With --min-speedup X, every configuration runs
again with min_speedup=X (each block timed against its layer at batch 1; slower ones left dense). Writes bench/results/latency.json.
"""
from __future__ import annotations
import argparse, copy, json, math, os, platform, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench')); import _env  # bench/_env.py: versions, machine, git state

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=25, help='timed forward passes per model and batch size (median reported; >= 20)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    p.add_argument('--cp-layers', nargs='+', default=['layer1', 'layer2'], help='the subset CP (and the reference tucker) decomposes')
    p.add_argument('--cp-iter', type=int, default=3, help='CP-ALS iterations: the block shapes (hence latency) do not depend on it')
    p.add_argument('--subset-all', action='store_true', help='also run svd and spatial on the CP subset')
    p.add_argument('--no-spatial-075', action='store_true', help='skip the extra spatial run at percent_removed=0.75 '
                   '(at 0.5 a square k×k conv is left dense: the kh×1 + 1×kw pair would have as many params)')
    p.add_argument('--channels-last', action='store_true', help='also time every pair with the models and input in channels_last memory format')
    p.add_argument('--min-speedup', type=float, default=None, help='also run every configuration with this min_speedup= (blocks not '
                   'that much faster than their layer, timed at the layer input, stay dense)')
    p.add_argument('--methods', nargs='+', default=['tucker', 'svd', 'spatial', 'cp'], help='the methods to run')
    p.add_argument('--profile', action='store_true', help='print a torch.profiler op table of each decomposed model at the largest batch')
    p.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'latency.json'))
    return p.parse_args()

ARGS = parse_args()
os.environ.setdefault('OPENBLAS_NUM_THREADS', str(ARGS.threads))

import torch
torch.set_num_threads(ARGS.threads)
from torch import nn
import torchvision
from fasterai.decompose.all import *

INPUT = (3, 224, 224)

def med(xs): return statistics.median(xs)

def md_table(headers, rows):
    def fmt(v):
        if isinstance(v, float): return f'{v:.4g}' if abs(v) < 1e4 else f'{v:,.0f}'
        return str(v)
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    lines += ['| ' + ' | '.join(fmt(v) for v in r) + ' |' for r in rows]
    return '\n'.join(lines)

def model_macs(model, shape=(1, *INPUT)):
    "Multiply-accumulates of every Conv and Linear for one input of `shape` (forward hooks; other layers are not counted)."
    total, hooks = [0], []
    def conv_hook(m, args, out): total[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    def lin_hook(m, args, out): total[0] += out.numel() * m.in_features
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)): hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear): hooks.append(m.register_forward_hook(lin_hook))
    try:
        with torch.inference_mode(): model(torch.zeros(shape))
    finally:
        for h in hooks: h.remove()
    return total[0]

def interleaved(dense, dec, x):
    "Median seconds of dense and decomposed forward passes, timed alternately (ABBA) after a warm-up."
    td, tx = [], []
    with torch.inference_mode():
        for _ in range(ARGS.warmup): dense(x); dec(x)
        for i in range(ARGS.repeats):
            order = ((dense, td), (dec, tx)) if i % 2 == 0 else ((dec, tx), (dense, td))
            for m, acc in order:
                t0 = time.perf_counter(); m(x); acc.append(time.perf_counter() - t0)
    return td, tx

def profile_model(label, model, bs, n=8):
    "torch.profiler table of the ops of a few forward passes of `model` at batch `bs`, grouped by op and input shape."
    from torch.profiler import profile, ProfilerActivity
    x = torch.randn(bs, *INPUT)
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(3): model(x)
    ev = sorted(p.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    tot = sum(e.self_cpu_time_total for e in ev)
    print(f'\nProfile of {label} at batch {bs} (3 passes; top ops by self time, with input shapes):\n', file=sys.stderr)
    print(md_table(['op', 'input shapes', 'calls', 'self ms / pass', 'share'],
                   [(e.key, str(e.input_shapes)[:70], e.count // 3, e.self_cpu_time_total / 3e3, f'{100 * e.self_cpu_time_total / tot:.1f}%') for e in ev[:n]]),
          file=sys.stderr)

def env_info(): return _env.env_info(torchvision=torchvision.__version__)

def main():
    t_start = time.perf_counter()
    env = env_info()
    print(f"# fasterai inference latency (CPU) — resnet18 {'×'.join(map(str, INPUT))}, torch {env['torch']}, {env['torch_threads']} threads, "
          f"{env['cpu']} ({env['cpu_count']} cores), OMP_WAIT_POLICY={env['omp_wait_policy']}, load avg {env['loadavg_start'][0]:.2f}, {env['time']}")
    if env['loadavg_start'][0] > 0.75 * (os.cpu_count() or 1):
        print(f"\n> WARNING: the machine is busy (1-min load {env['loadavg_start'][0]:.1f} on {os.cpu_count()} cores): absolute latencies are noisy; "
              "the interleaved speedups are the robust number")
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(weights=None).eval()
    dense_params, dense_macs = n_params(dense), model_macs(dense)
    if ARGS.profile: profile_model('dense resnet18', dense, max(ARGS.batches))
    configs = [('tucker', 'all convs', dict(method='tucker')), ('svd', 'all convs', dict(method='svd')),
               ('spatial', 'all convs', dict(method='spatial'))]
    if not ARGS.no_spatial_075: configs += [('spatial', 'all convs, percent_removed=0.75', dict(method='spatial', percent_removed=0.75))]
    configs += [
               ('cp', '+'.join(ARGS.cp_layers), dict(method='cp', layers=ARGS.cp_layers, cp_iter=ARGS.cp_iter)),
               ('tucker', '+'.join(ARGS.cp_layers), dict(method='tucker', layers=ARGS.cp_layers))]
    if ARGS.subset_all:
        configs += [(m, '+'.join(ARGS.cp_layers), dict(method=m, layers=ARGS.cp_layers)) for m in ('svd', 'spatial')]
    configs = [c for c in configs if c[0] in ARGS.methods]
    if ARGS.min_speedup is not None:
        configs = [v for c in configs for v in (c, (c[0], f'{c[1]}, min_speedup={ARGS.min_speedup}', {**c[2], 'min_speedup': ARGS.min_speedup}))]
    results, rows = [], []
    for method, scope, kw in configs:
        dec = Conv_Decomposer()
        t0 = time.perf_counter()
        small = dec.decompose(dense, input_shape=(1, *INPUT), verbose=False, **{'percent_removed': 0.5, **kw}).eval()
        dec_s = time.perf_counter() - t0
        rep = dec.report
        done = rep[rep.status == 'decomposed']
        r = dict(method=method, scope=scope, kwargs=kw, decompose_seconds=dec_s, layers_decomposed=len(done), layers=len(rep),
                 report_params_before=int(done.params_before.sum()), report_params_after=int(done.params_after.sum()),
                 report_macs_before=int(done.macs_before.sum()), report_macs_after=int(done.macs_after.sum()),
                 model_params_before=dense_params, model_params_after=n_params(small),
                 model_macs_before=dense_macs, model_macs_after=model_macs(small), latency={})
        layouts = [('NCHW', dense, small)]
        if ARGS.channels_last:
            layouts.append(('channels_last', copy.deepcopy(dense).to(memory_format=torch.channels_last), copy.deepcopy(small).to(memory_format=torch.channels_last)))
        for layout, d_m, s_m in layouts:
            for bs in ARGS.batches:
                x = torch.randn(bs, *INPUT, generator=torch.Generator().manual_seed(bs))
                if layout == 'channels_last': x = x.contiguous(memory_format=torch.channels_last)
                td, tx = interleaved(d_m, s_m, x)
                pair = med([a / b for a, b in zip(td, tx)])
                r['latency'][f'{layout} b{bs}'] = dict(layout=layout, batch=bs, dense_ms=[t * 1e3 for t in td], decomposed_ms=[t * 1e3 for t in tx],
                                                      dense_median_ms=med(td) * 1e3, decomposed_median_ms=med(tx) * 1e3,
                                                      speedup=med(td) / med(tx), speedup_pairwise_median=pair)
                rows.append((method, scope, layout, bs, med(td) * 1e3, med(tx) * 1e3, f'{med(td) / med(tx):.2f}×', f'{pair:.2f}×',
                             f"{r['model_params_after'] / 1e6:.2f}M / {dense_params / 1e6:.2f}M",
                             f"{r['model_macs_after'] / 1e9:.3f}G / {dense_macs / 1e9:.3f}G",
                             f"{r['report_macs_after'] / 1e9:.3f}G / {r['report_macs_before'] / 1e9:.3f}G ({len(done)}/{len(rep)})"))
        skipped = rep[rep.status == 'skipped']
        r['skip_reasons'] = {k: int(v) for k, v in skipped.reason.astype(str).str.replace(r' at ranks .*', ' at these ranks', regex=True).value_counts().items()}
        results.append(r)
        print(f'  decomposed {method} ({scope}) in {dec_s:.1f} s', file=sys.stderr, flush=True)
        if ARGS.profile: profile_model(f'{method} ({scope})', small, max(ARGS.batches))
    print()
    print(md_table(['method', 'scope', 'layout', 'batch', 'dense ms', 'decomposed ms', 'speedup', 'speedup (pairwise median)',
                    'model params (dec / dense)', 'model MACs b=1 (dec / dense)', 'decomposed layers MACs b=1 (after / before, from report)'], rows))
    print(f"\nMedians of {ARGS.repeats} interleaved runs after {ARGS.warmup} warm-ups; speedup = dense / decomposed (both in the same layout). "
          f"CP: cp_iter={ARGS.cp_iter} (weights not converged; latency depends only on the block shapes).")
    print('\nLayers left dense (reason: count):')
    for r in results:
        if r['skip_reasons']: print(f"- {r['method']} ({r['scope']}): " + '; '.join(f'{k}: {v}' for k, v in r['skip_reasons'].items()))
    env['loadavg_end'] = os.getloadavg()
    out = Path(ARGS.out); out.parent.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - t_start
    out.write_text(json.dumps(dict(env=env, args=vars(ARGS), input=INPUT, results=results, total_seconds=total), indent=1, default=str))
    print(f"\nTotal {total:.0f} s; load avg at end {env['loadavg_end'][0]:.2f}; results in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")

if __name__ == '__main__':
    main()
