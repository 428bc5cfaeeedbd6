"""Decomposition speed, ours vs tensorly's partial_tucker in the same run (medians of repeats).

    .venv/bin/python bench/speed.py"""
import time, statistics, torch, torchvision
import tensorly as tl
from tensorly.decomposition import partial_tucker
from fasterai.decompose.all import *
from fasterai.decompose.factorize import tucker2_weight

torch.manual_seed(0); torch.set_num_threads(2)
def med(f, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); out = f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts), out

W = torch.randn(512, 512, 3, 3)
# a layer with a decaying spectrum, as trained layers have
U, _ = torch.linalg.qr(torch.randn(512, 512)); V, _ = torch.linalg.qr(torch.randn(4608, 512))
Wd = (U * torch.arange(1, 513).float().pow(-1.0)) @ V.T
Wd = Wd.reshape(512, 512, 3, 3)
print('| layer | ours s | iters | rel err | tensorly s | tensorly rel err |\n|---|---|---|---|---|---|')
for name, w in [('random 512x512x3x3', W), ('decaying spectrum 512x512x3x3', Wd)]:
    t, (core, Uo, Ui, info) = med(lambda: tucker2(w, 256, 256, n_iter=10, tol=1e-4))
    err = ((w - tucker2_weight(core, Uo, Ui)).norm() / w.norm()).item()
    tl.set_backend('pytorch')
    tt, res = med(lambda: partial_tucker(w, rank=[256, 256], modes=[0, 1], n_iter_max=10, tol=1e-4, init='svd'), n=1)
    (c2, f2), _ = res
    err2 = ((w - tl.tenalg.multi_mode_dot(c2, f2, modes=[0, 1])).norm() / w.norm()).item()
    print(f'| {name} | {t:.3f} | {info["iterations"]} | {err:.4f} | {tt:.3f} | {err2:.4f} |')
m = torchvision.models.resnet18()
t, _ = med(lambda: Conv_Decomposer().decompose(m, method='tucker', verbose=False))
print(f'\nresnet18, all convs, tucker: {t:.2f} s')
t, _ = med(lambda: Conv_Decomposer().decompose(m, method='svd', verbose=False))
print(f'resnet18, all convs, svd: {t:.2f} s')
v = torchvision.models.vgg16_bn()
t, _ = med(lambda: FC_Decomposer().decompose(v, verbose=False), n=1)
print(f'vgg16_bn, all Linears, svd: {t:.2f} s')
