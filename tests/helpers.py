"Helpers shared by the test modules."
import torch

def snapshot(model):
    "Everything about `model` a decomposition must not change: state, module types, requires_grad, modes."
    return ({k: v.clone() for k, v in model.state_dict().items()}, [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], [m.training for m in model.modules()])


def same(model, snap):
    "Is `model` exactly as in `snap`?"
    sd, types, grads, modes = snap
    now = model.state_dict()
    return (now.keys() == sd.keys() and all(torch.equal(now[k], v) for k, v in sd.items())
            and [(n, type(m)) for n, m in model.named_modules()] == types
            and [(n, p.requires_grad) for n, p in model.named_parameters()] == grads
            and [m.training for m in model.modules()] == modes)


def rel(a, b):
    "Relative error of `a` to the reference `b`, both taken to float64."
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
