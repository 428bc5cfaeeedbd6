"Every torchvision classification architecture still runs after decomposition with defaults."
import pytest, torch, torchvision
from fasterai.decompose.all import *

tv = torchvision.models
NC = 10
# name → (constructor without weights, smallest convenient input size)
MODELS = {
    'resnet18': (lambda: tv.resnet18(num_classes=NC), 64),
    'resnet50': (lambda: tv.resnet50(num_classes=NC), 64),
    'vgg16_bn': (lambda: tv.vgg16_bn(num_classes=NC), 32),
    'mobilenet_v2': (lambda: tv.mobilenet_v2(num_classes=NC), 64),
    'densenet121': (lambda: tv.densenet121(num_classes=NC), 64),
    'squeezenet1_1': (lambda: tv.squeezenet1_1(num_classes=NC), 64),
    'efficientnet_b0': (lambda: tv.efficientnet_b0(num_classes=NC), 64),
    'convnext_tiny': (lambda: tv.convnext_tiny(num_classes=NC), 64),
    'googlenet': (lambda: tv.googlenet(num_classes=NC, aux_logits=False, init_weights=False), 64),
    'vit_b_16': (lambda: tv.vit_b_16(num_classes=NC, image_size=32), 32),
    'swin_t': (lambda: tv.swin_t(num_classes=NC), 224),
}
NO_LINEAR_TO_CUT = {'squeezenet1_1'}            # its classifier is a 1×1 conv



def check_runs(out, x, dec):
    with torch.no_grad(): y = out(x)
    assert y.shape == (1, NC) and torch.isfinite(y).all()
    rep = dec.report
    assert set(rep.status) <= {'decomposed', 'skipped'}
    skipped = rep[rep.status == 'skipped']
    assert skipped.reason.map(lambda r: isinstance(r, str) and len(r) > 0).all()      # every skip says why
    d = rep[rep.status == 'decomposed']
    assert (d.params_after < d.params_before).all()                                    # defaults never grow a layer
    return rep


@pytest.mark.slow
@pytest.mark.parametrize('name', list(MODELS))
def test_torchvision_runs_after_decompose(name):
    torch.manual_seed(0)
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(): y0 = model(x)
    types0 = [type(m) for m in model.modules()]

    dec = Conv_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = check_runs(out, x, dec)
    assert (rep.status == 'decomposed').any()
    assert n_params(out) <= n_params(model)
    assert any(isinstance(m, LowRankConv) for m in out.modules())

    dec = FC_Decomposer()
    out = dec.decompose(model, verbose=False)
    rep = check_runs(out, x, dec)
    if name not in NO_LINEAR_TO_CUT:
        assert (rep.status == 'decomposed').any() and any(isinstance(m, LowRankLinear) for m in out.modules())
    assert n_params(out) <= n_params(model)

    # the caller's model is untouched
    assert [type(m) for m in model.modules()] == types0
    with torch.no_grad(): assert torch.equal(model(x), y0)


@pytest.mark.slow
@pytest.mark.parametrize('name,owner,attrs', [('vit_b_16', 'MultiheadAttention', ('out_proj',)),
                                              ('swin_t', 'ShiftedWindowAttention', ('qkv', 'proj'))])
def test_attention_linears_read_directly_are_skipped(name, owner, attrs):
    torch.manual_seed(0)
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(1, 3, size, size)
    dec = FC_Decomposer()
    out = dec.decompose(model, percent_removed=0.9, layers=['encoder.layers.encoder_layer_0', 'encoder.layers.encoder_layer_1']
                        if name == 'vit_b_16' else ['features.1', 'features.3'], verbose=False)
    rep = dec.report
    attn = rep[rep.name.map(lambda n: n.rsplit('.', 1)[-1] in attrs)]
    assert len(attn) >= 2 * len(attrs)
    assert (attn.status == 'skipped').all()
    for row in attn.itertuples():
        attr = row.name.rsplit('.', 1)[-1]
        assert owner in row.reason and f'.{attr}.weight' in row.reason, row.reason
        mod = out.get_submodule(row.name)
        assert type(mod) is type(model.get_submodule(row.name))
    others = rep[~rep.index.isin(attn.index)]
    assert len(others) and (others.status == 'decomposed').all()               # the MLP Linears are cut
    with torch.no_grad(): y = out(x)
    assert y.shape == (1, NC) and torch.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mobilenet_v2', 'googlenet'])
def test_conv_then_fc_then_again(name):
    "Both decomposers chained, then run again: nothing is decomposed twice."
    torch.manual_seed(0)
    make, size = MODELS[name]
    model = make().eval()
    x = torch.randn(1, 3, size, size)
    out = FC_Decomposer().decompose(Conv_Decomposer().decompose(model, verbose=False), verbose=False)
    with torch.no_grad(): y = out(x)
    assert y.shape == (1, NC) and torch.isfinite(y).all()
    n = n_params(out)
    for D in (Conv_Decomposer, FC_Decomposer):
        dec = D()
        again = dec.decompose(out, verbose=False)
        assert n_params(again) == n
        assert not (dec.report.status == 'decomposed').any()
        assert (dec.report[dec.report.reason == 'already decomposed'].status == 'skipped').all()
        assert (dec.report.reason == 'already decomposed').any()
    with torch.no_grad(): torch.testing.assert_close(again(x), y)


@pytest.mark.slow
def test_resnet18_with_input_shape_reports_macs():
    torch.manual_seed(0)
    model = tv.resnet18(num_classes=NC).eval()
    dec = Conv_Decomposer()
    out = dec.decompose(model, input_shape=(1, 3, 64, 64), layers=['conv1', 'layer1', 'layer2'], verbose=False)
    rep = dec.report
    d = rep[rep.status == 'decomposed']
    assert len(d) >= 6 and d.macs_before.notna().all() and (d.macs_after < d.macs_before).all()
    # 64×64 input: conv1 (stride 2) sees 64×64, layer1 16×16, layer2.0.conv1 16×16 → 8×8
    assert rep.set_index('name').loc['layer1.0.conv1'].macs_before == 64 * 64 * 9 * 16 * 16
    with torch.no_grad(): assert out(torch.randn(1, 3, 64, 64)).shape == (1, NC)
