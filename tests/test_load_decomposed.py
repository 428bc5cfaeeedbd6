"`load_decomposed`: a decomposed model's state_dict loads into the dense architecture it came from."
import os, io
import pytest, torch, torchvision
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose


def roundtrip(sd):
    buf = io.BytesIO(); torch.save(sd, buf); buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize('method', ['tucker', 'svd', 'spatial'])
def test_resnet18_budget_roundtrip(method):
    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    small = decompose(dense, 0.5, method=method, compact=True, verbose=False)
    back = load_decomposed(torchvision.models.resnet18(num_classes=10), roundtrip(small.state_dict())).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(back(x), small(x))
    assert [type(m).__name__ for m in back.modules()] == [type(m).__name__ for m in small.modules()]


def test_conv_methods_on_odd_layers_roundtrip():
    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv1d(3, 12, 5, stride=2, dilation=2, padding=3, padding_mode='circular'), nn.ReLU(),
                             nn.Conv1d(12, 12, 3, groups=3, padding='same'), nn.ReLU(), nn.Conv1d(12, 6, 3, bias=False))
    x = torch.randn(2, 3, 40)
    for method in ('tucker', 'svd', 'cp'):
        small = Conv_Decomposer().decompose(net(), 0.5, method=method, allow_growth=True, verbose=False)
        back = load_decomposed(net(), roundtrip(small.state_dict()))
        assert torch.equal(back(x), small(x)), method


def test_frozen_and_train_mode_and_own_buffers_carry_over():
    m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)); m[0].register_buffer('scale', torch.tensor(3.))
    small = FC_Decomposer().decompose(m, 0.75, verbose=False)
    fresh = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8)); fresh[0].register_buffer('scale', torch.tensor(0.))
    fresh.requires_grad_(False).eval()
    back = load_decomposed(fresh, small.state_dict())
    assert isinstance(back[0], LowRankLinear) and float(back[0].scale) == 3.
    assert not any(p.requires_grad for p in back.parameters()) and not back[0].training
    assert back[0].in_features == 32 and back[0].out_features == 32


def test_a_state_dict_of_another_model_is_refused():
    small = Conv_Decomposer().decompose(nn.Sequential(nn.Conv2d(8, 16, 3)), 0.5, verbose=False)
    with pytest.raises(ValueError, match="saved block at '0'"): load_decomposed(nn.Sequential(nn.Conv2d(8, 16, 5)), small.state_dict())
    with pytest.raises(TypeError, match='state_dict must be'): load_decomposed(nn.Sequential(nn.Conv2d(8, 16, 3)), [1, 2])


transformers = pytest.importorskip('transformers')


def test_gpt2_save_pretrained_then_load(tmp_path):
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    dense = transformers.GPT2Model(cfg).eval()
    dense.save_pretrained(tmp_path / 'dense')
    data = [{'input_ids': torch.randint(0, 100, (8, 16))} for _ in range(2)]
    small = decompose(dense, 0.6, data=data, verbose=False)
    small.save_pretrained(tmp_path / 'small')                               # safetensors
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / 'small' / 'model.safetensors'))
    back = load_decomposed(transformers.GPT2Model.from_pretrained(tmp_path / 'dense').eval(), sd, strict=False)
    ids = torch.randint(0, 100, (3, 16))
    assert torch.allclose(back(ids).last_hidden_state, small(ids).last_hidden_state, atol=1e-6)
    assert isinstance(back.h[0].mlp.c_fc, LowRankLinear)
