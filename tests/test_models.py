"Every torchvision classification architecture still runs after decomposition with defaults."
import pytest, torch, torchvision
from fasterai.decompose.all import *

MODELS = {
    'resnet18': (lambda: torchvision.models.resnet18(), 64), 'resnet50': (lambda: torchvision.models.resnet50(), 64),
    'vgg16_bn': (lambda: torchvision.models.vgg16_bn(), 32), 'mobilenet_v2': (lambda: torchvision.models.mobilenet_v2(), 64),
    'densenet121': (lambda: torchvision.models.densenet121(), 64), 'squeezenet1_1': (lambda: torchvision.models.squeezenet1_1(), 64),
    'efficientnet_b0': (lambda: torchvision.models.efficientnet_b0(), 64), 'convnext_tiny': (lambda: torchvision.models.convnext_tiny(), 64),
    'googlenet': (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), 64),
    'vit_b_16': (lambda: torchvision.models.vit_b_16(), 224), 'swin_t': (lambda: torchvision.models.swin_t(), 224),
}

@pytest.mark.slow
@pytest.mark.parametrize('name', list(MODELS))
def test_torchvision_forward_after_decompose(name):
    torch.manual_seed(0)
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(1, 3, size, size)
    small = Conv_Decomposer().decompose(model, verbose=False)
    fc = FC_Decomposer()
    small = fc.decompose(small, verbose=False)
    with torch.no_grad(): y = small(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    assert n_params(small) <= n_params(model)
    assert any(isinstance(m, LowRankBlock) for m in small.modules()) or name == 'squeezenet1_1'
    if name in ('vit_b_16', 'swin_t'):
        skipped = fc.report[fc.report.status == 'skipped']
        assert skipped.reason.str.contains('reads').any()
