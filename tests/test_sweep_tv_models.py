"""Failures found by a sweep over torchvision's detection, segmentation and video models: empty detector outputs, layer
sensitivities many orders of magnitude apart."""
import warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose


class Scale(nn.Module):
    def __init__(self, c): super().__init__(); self.c = c
    def forward(self, x): return x * self.c


def test_budget_lands_when_sensitivities_span_many_decades():
    torch.manual_seed(0)
    layers = []
    for i in range(16):
        layers += [nn.Linear(256, 256), nn.ReLU()]
        if i == 11: layers.append(Scale(1e-22))                  # the first 12 layers barely reach the output
    m = nn.Sequential(*layers).eval()
    data = [torch.randn(64, 256) for _ in range(2)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out = decompose(m, budget=0.5, data=data, verbose=False)
    assert abs(n_params(out) / n_params(m) - 0.5) < 0.01        # an absolute bisection floor kept 44%
    assert not [x for x in w if 'closest allocation' in str(x.message)]


class Detector(nn.Module):
    "Returns [{'boxes': ...}] with the boxes scoring above a threshold: none, on these inputs."
    def __init__(self):
        super().__init__(); self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.head = nn.Linear(32, 4)
    def forward(self, x):
        boxes = self.head(self.body(x).mean((2, 3)))
        return [{'boxes': boxes[boxes.sum(1) > 1e6]}]


def test_empty_detector_output_falls_back_with_the_reason():
    torch.manual_seed(0)
    m = Detector().eval()
    data = [torch.randn(2, 3, 16, 16)]
    with pytest.raises(TypeError, match='empty on every calibration batch'):
        output_grams(m, data, {'body.2': m.body[2]})
    with pytest.warns(UserWarning, match='empty on every calibration batch'):
        out = decompose(m, budget=0.6, data=data, verbose=False)
    assert (decompose.report.status == 'decomposed').any()


class BoxHead(nn.Module):
    "A backbone, then Linears on every spatial position as its own row: (B·H·W, C), as a detector's box head runs on N regions."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1))
        self.fc6, self.fc7 = nn.Linear(64, 256), nn.Linear(256, 256)
    def forward(self, x):
        rows = self.body(x).flatten(2).transpose(1, 2).reshape(-1, 64)
        return self.fc7(torch.relu(self.fc6(rows))).reshape(x.shape[0], -1).mean(1, keepdim=True)


def conv_linear_macs(model, x):
    total, hooks = [0], []
    for m in model.modules():
        if isinstance(m, nn.Conv2d): hooks.append(m.register_forward_hook(lambda m, a, o: total.__setitem__(0, total[0] + o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])))
        elif isinstance(m, nn.Linear): hooks.append(m.register_forward_hook(lambda m, a, o: total.__setitem__(0, total[0] + o.numel() * m.in_features)))
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    return total[0]


@pytest.mark.parametrize('source', ['input_shape', 'data'])
def test_macs_of_linears_on_many_rows_per_sample(source):
    torch.manual_seed(0)
    m = BoxHead().eval()
    x = torch.randn(1, 3, 16, 16)
    kw = dict(input_shape=(2, 3, 16, 16)) if source == 'input_shape' else dict(data=[torch.randn(4, 3, 16, 16)])
    d = FC_Decomposer()
    d.decompose(m, percent_removed=0.5, verbose=False, **kw)
    test_rows = d.report.set_index('name')
    assert test_rows.loc['fc6', 'macs_before'] == 64 * 64 * 256                # 64 rows of one image, not one
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = decompose(m, budget=0.5, budget_on='macs', verbose=False, **kw)
    assert abs(conv_linear_macs(out, x) / conv_linear_macs(m, x) - 0.5) < 0.01


def test_macs_budget_warns_about_layers_run_functionally():
    class Owner(nn.Module):                                  # runs its child's weight itself, as torchvision's Swin3d attention does
        def __init__(self): super().__init__(); self.qkv = nn.Linear(32, 96); self.out = nn.Linear(96, 32)
        def forward(self, x): return self.out(nn.functional.linear(x, self.qkv.weight, self.qkv.bias))
    m = nn.Sequential(nn.Linear(32, 32), Owner()).eval()
    with pytest.warns(UserWarning, match=r"1 candidate layer\(s\) were not called as modules on this input \(1.qkv\)"):
        decompose(m, budget=0.7, budget_on='macs', input_shape=(4, 32), verbose=False)
    assert 'reads .qkv.weight directly' in decompose.report.set_index('name').loc['1.qkv', 'reason']
