"""The digits CNN the benchmarks share (bench_digits.py, bench_distill.py): the model, and its training, cached."""
from pathlib import Path
import torch
from torch import nn
from fasterai.data.digits import digits_arrays

CACHE = Path(__file__).parent / '_cache'

def digits_tensors(): return digits_arrays(size=32, seed=0)

def _block(ni, nf): return [nn.Conv2d(ni, nf, 3, padding=1, bias=False), nn.BatchNorm2d(nf), nn.ReLU(inplace=True)]

def digits_cnn(w=32):
    "The 5-conv VGG-style CNN bench_digits.py was measured on (273k params, 28.7M MACs)."
    return nn.Sequential(*_block(1, w), *_block(w, w), nn.MaxPool2d(2), *_block(w, 2 * w), *_block(2 * w, 2 * w), nn.MaxPool2d(2),
                         *_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16 * w, 256), nn.ReLU(inplace=True), nn.Linear(256, 10))

def trained_cnn(xt, yt):
    "`digits_cnn()` trained 6 epochs of AdamW one-cycle at 3e-3 on (`xt`, `yt`), or loaded from bench/_cache/ (git-ignored)."
    CACHE.mkdir(exist_ok=True)
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
