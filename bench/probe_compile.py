"""Does torch.compile pay on this CPU? resnet18 (random weights), dense and cut by budget_on="latency" (0.5, tucker),
each in eager mode and under torch.compile (inductor), batch 1, timed interleaved in one process (latency.model_ms).

    taskset -c 0 .venv/bin/python bench/probe_compile.py        # 1 thread
"""
import torch, torchvision, warnings, time, copy
torch.set_num_threads(1); warnings.simplefilter('ignore')
from fasterai.decompose.all import *
from fasterai.decompose.latency import model_ms
dense = torchvision.models.resnet18().eval()
x = torch.randn(1, 3, 224, 224)
dec = Budget_Decomposer().decompose(dense, budget=0.5, budget_on='latency', method='tucker', input_shape=(1,3,224,224), verbose=False)
t = time.time()
with torch.no_grad():
    cd = torch.compile(copy.deepcopy(dense)); cd(x)
    print('compile dense s', time.time() - t); t = time.time()
    cdec = torch.compile(copy.deepcopy(dec)); cdec(x)
    print('compile dec s', time.time() - t)
ms = model_ms([dense, dec, cd, cdec], x, 'eager', min_time=0.5)
print('eager dense %.1f dec %.1f | compiled dense %.1f dec %.1f' % tuple(ms))
