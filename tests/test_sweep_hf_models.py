"""Failures found by a sweep over Hugging Face architectures: weights read from far above, layers called several times,
gradients that autograd cannot see, float16 sensitivities."""
import math, warnings
import pytest, torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.budget import decompose
from helpers import snapshot, same


def hooked_macs(model, x):
    "Conv2d/Linear MACs of one forward pass, every call counted (forward hooks)."
    total, hooks = [0], []
    def conv(m, a, o): total[0] += o[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    def lin(m, a, o): total[0] += o[0].numel() * m.in_features
    for m in model.modules():
        if isinstance(m, nn.Conv2d): hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear): hooks.append(m.register_forward_hook(lin))
    with torch.no_grad(): model(x)
    for h in hooks: h.remove()
    return total[0]


class Thrice(nn.Module):
    "One Linear applied three times per forward (ALBERT shares its layers across depth this way)."
    def __init__(self):
        super().__init__(); self.a, self.lin, self.head = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 10)
    def forward(self, x):
        h = self.a(x)
        for _ in range(3): h = torch.relu(self.lin(h))
        return self.head(h)


class Pyramid(nn.Module):
    "A head conv shared by two feature-pyramid levels of different sizes (RetinaNet/FCOS heads do this)."
    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, 2, 1)
        self.head, self.cls = nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 8, 1)
    def forward(self, x):
        a = torch.relu(self.stem(x)); b = torch.relu(self.down(a))
        return self.cls(torch.relu(self.head(a))).mean((2, 3)) + self.cls(torch.relu(self.head(b))).mean((2, 3))


@pytest.mark.parametrize('net,shape', [(Thrice, (1, 32)), (Pyramid, (1, 3, 32, 32))])
@pytest.mark.parametrize('budget', [0.5, 0.7])
def test_macs_budget_counts_every_call(net, shape, budget):
    torch.manual_seed(0)
    m = net().eval()
    x = torch.randn(*shape)
    data = [torch.randn(8, *shape[1:])]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        out = decompose(m, budget=budget, budget_on='macs', data=data, method='svd', verbose=False)
    kept = hooked_macs(out, x) / hooked_macs(m, x)
    assert abs(kept - budget) < 0.01, kept                     # counting each shared layer once gave 0.64 for 0.5


def test_report_macs_of_a_shared_conv_are_per_forward():
    m = Pyramid().eval()
    d = Conv_Decomposer()
    out = d.decompose(m, method='svd', percent_removed=0.6, input_shape=(1, 3, 32, 32), verbose=False)
    head = d.report.set_index('name').loc['head']
    assert head.macs_before == 64 * 64 * 9 * (32 * 32 + 16 * 16)           # both levels
    x = torch.randn(1, 3, 32, 32)
    assert abs(d.report.macs_after.sum() / d.report.macs_before.sum() - hooked_macs(out, x) / hooked_macs(m, x)) < 1e-9


def test_sensitivity_of_a_layer_called_twice():
    class Twice(nn.Module):                                   # only the first call's output matters (the second is scaled by 0)
        def __init__(self): super().__init__(); self.lin, self.head = nn.Linear(16, 16), nn.Linear(16, 4)
        def forward(self, x): return self.head(self.lin(x) + 0.0 * self.lin(x.flip(-1)))
    torch.manual_seed(0)
    m = Twice().eval()
    data = [torch.randn(32, 16)]
    assert float(output_grams(m, data, {'lin': m.lin})['lin'].trace()) > 0     # was 0: only the last call's probe was read
    decompose(m, budget=0.6, data=data, verbose=False)
    assert 'sensitivity 0' not in ' '.join(decompose.report.reason.dropna())


def test_no_gradient_anywhere_falls_back_to_energy_shares():
    class Recompute(torch.autograd.Function):                 # reversible layers recompute their inside like this
        @staticmethod
        def forward(ctx, x, f): return f(x)
        @staticmethod
        def backward(ctx, g): return g, None
    class Net(nn.Module):
        def __init__(self):
            super().__init__(); self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)); self.scale = nn.Parameter(torch.ones(32))
        def forward(self, x): return Recompute.apply(x, self.body) * self.scale
    torch.manual_seed(0)
    m = Net().eval()
    with pytest.warns(UserWarning, match='no gradient at any layer'):
        out = decompose(m, budget=0.6, data=[torch.randn(16, 32)], verbose=False)
    assert (decompose.report.status == 'decomposed').any()
    assert torch.isfinite(out(torch.randn(2, 32))).all()


def test_weight_read_from_far_above_is_left_dense():
    class Patches(nn.Module):
        def __init__(self): super().__init__(); self.projection = nn.Conv2d(3, 16, 4, 4)
        def forward(self, x): return self.projection(x)
    class Embeddings(nn.Module):
        def __init__(self): super().__init__(); self.patch_embeddings = Patches()
        def forward(self, x): return self.patch_embeddings(x)
    class Model(nn.Module):                                   # as transformers' ViTModel.forward does
        def __init__(self): super().__init__(); self.embeddings = Embeddings(); self.head = nn.Linear(16, 4)
        def forward(self, x):
            x = x.to(self.embeddings.patch_embeddings.projection.weight.dtype)
            return self.head(self.embeddings(x).mean((2, 3)))
    m = Model().eval()
    snap = snapshot(m)
    d = Conv_Decomposer()
    out = d.decompose(m, percent_removed=0.5, verbose=False)
    assert d.report.reason[0] == 'owner Model reads .embeddings.patch_embeddings.projection.weight directly'
    assert torch.isfinite(out(torch.randn(2, 3, 16, 16))).all() and same(m, snap)


def test_a_model_that_breaks_after_the_swap_raises_and_keeps_the_callers_model():
    class Sneaky(nn.Module):                                  # reads the weight in a way no source check sees
        def __init__(self): super().__init__(); self.fc = nn.Linear(64, 64)
        def forward(self, x): return self.fc(x) * getattr(self, 'f' + 'c').weight.mean()
    m = Sneaky()
    snap = snapshot(m)
    with pytest.raises(RuntimeError, match='does not run.*exclude='):
        FC_Decomposer().decompose(m, percent_removed=0.75, input_shape=(2, 64), verbose=False)
    assert same(m, snap)


def test_vit_from_transformers():
    transformers = pytest.importorskip('transformers')
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    torch.manual_seed(0)
    m = transformers.ViTModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    small = Conv_Decomposer().decompose(m, percent_removed=0.5, verbose=False)
    assert small(pixel_values=x).last_hidden_state.shape == (2, 17, 32)
    small = decompose(m, budget=0.5, data=[{'pixel_values': x}], verbose=False)
    assert torch.isfinite(small(pixel_values=x).last_hidden_state).all()
    assert (decompose.report.status == 'decomposed').sum() >= 4


def _saved(model, tmp_path):
    from safetensors.torch import load_file
    model.save_pretrained(tmp_path)
    return load_file(str(tmp_path / 'model.safetensors'))


def test_load_decomposed_reads_transformers_checkpoint_names(tmp_path):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8)
    torch.manual_seed(0)
    small = FC_Decomposer().decompose(transformers.ViTModel(cfg).eval(), percent_removed=0.75, verbose=False)
    sd = _saved(small, tmp_path)
    assert not any(k.startswith('layers.') for k in sd)                      # saved under the old names (encoder.layer.0...)
    back = load_decomposed(transformers.ViTModel(cfg).eval(), sd)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(pixel_values=x).last_hidden_state, small(pixel_values=x).last_hidden_state)
    assert sum(isinstance(m, LowRankBlock) for m in back.modules()) == sum(isinstance(m, LowRankBlock) for m in small.modules()) > 0


def test_load_decomposed_strict_with_a_tied_head(tmp_path):
    transformers = pytest.importorskip('transformers')
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    small = FC_Decomposer().decompose(transformers.LlamaForCausalLM(cfg).eval(), percent_removed=0.75, verbose=False)
    sd = _saved(small, tmp_path)
    assert 'lm_head.weight' not in sd                                         # safetensors keeps a tied weight once
    back = load_decomposed(transformers.LlamaForCausalLM(cfg).eval(), sd)     # strict: the tie is not a missing key
    ids = torch.randint(0, 64, (1, 7))
    assert torch.equal(back(ids).logits, small(ids).logits) and back.lm_head.weight is back.model.embed_tokens.weight
    del sd['model.norm.weight']
    with pytest.raises(RuntimeError, match='missing keys'):
        load_decomposed(transformers.LlamaForCausalLM(cfg).eval(), sd)
