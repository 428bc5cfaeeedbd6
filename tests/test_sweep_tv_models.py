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
