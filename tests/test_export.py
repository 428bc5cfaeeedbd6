"Decomposed models export: torch.export and ONNX (run by onnxruntime) give the eager model's outputs."
import warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from helpers import rel

onnxruntime = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


def every_block():
    "A small CNN whose four 3×3 convs get the four conv methods and whose Linears get plain and compact SVD."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, (3, 1), padding='same', padding_mode='reflect'), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    for method, name in [('tucker', '3'), ('svd', '5'), ('spatial', '9'), ('cp', '7')]:
        if method == 'spatial': continue
        model = Conv_Decomposer().decompose(model, method=method, percent_removed=0.5, layers=[name], verbose=False)
    model = Conv_Decomposer().decompose(model, method='spatial', percent_removed=0.75, layers=['9'], verbose=False)
    model = FC_Decomposer().decompose(model, percent_removed=0.5, layers=['13'], verbose=False)
    model = FC_Decomposer().decompose(model, percent_removed=0.5, layers=['15'], compact=True, verbose=False)
    blocks = [m for m in model.modules() if isinstance(m, LowRankBlock)]
    assert sorted(b.method for b in blocks) == ['cp', 'spatial', 'svd', 'svd', 'svd', 'tucker'], [b.method for b in blocks]
    return model


@pytest.fixture(scope='module')
def model_and_input():
    return every_block(), torch.randn(2, 3, 16, 16)


def test_torch_export_matches_eager(model_and_input):
    model, x = model_and_input
    ep = torch.export.export(model, (x,))
    with torch.no_grad(): assert rel(ep.module()(x), model(x)) < 1e-6


@pytest.mark.slow
def test_onnx_runs_under_onnxruntime(model_and_input, tmp_path):
    model, x = model_and_input
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(str(tmp_path / 'm.onnx'))
    sess = onnxruntime.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad(): assert rel(torch.from_numpy(y), model(x)) < 1e-5
