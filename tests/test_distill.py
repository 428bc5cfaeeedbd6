"Distillation: the teacher is untouched, hooks are removed, the loss decreases, runs reproduce, bad arguments are refused."
import copy
import pytest
import torch
from torch import nn
from fasterai.decompose.all import *
from fasterai.decompose.distill import distill, DistillLoss, Staged_Decomposer, merge_blocks, DistillCallback, decomposed_names

def toy(seed=0):
    "A fixed toy problem: a teacher MLP, a student made by cutting its Linears to rank 2, 8 batches of inputs."
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in teacher.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(256, 8, generator=g)
    student = FC_Decomposer().decompose(teacher, percent_removed=0.6, verbose=False)
    return teacher, student, list(x.split(32))

def no_hooks(*models): return not any(m._forward_hooks or m._forward_pre_hooks for model in models for m in model.modules())

def snapshot(m): return {k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()], m.training

# the last factor: how far the loss must fall (a rank-cut layer matched on its own output has a floor: its best rank-k fit)
@pytest.mark.parametrize('kw,factor', [(dict(loss='mse'), 0.7), (dict(loss='kl'), 0.7),
                                       (dict(loss='cosine+mse', layers='decomposed'), 0.7), (dict(loss=None, layers=['0', '2']), 0.9),
                                       (dict(layers='decomposed', local='teacher'), 0.9), (dict(layers='decomposed', local='student', warmup=0.1), 0.9)])
def test_teacher_untouched_hooks_removed_loss_decreases(kw, factor):
    teacher, student, data = toy()
    teacher.train()                                              # a teacher left in train mode stays in train mode
    before = snapshot(teacher)
    hist = []
    out = distill(student, teacher, data, epochs=15, lr=3e-3, seed=0, history=hist, **kw)
    sd, rg, tr = before
    assert all(torch.equal(sd[k], v) for k, v in teacher.state_dict().items())
    assert [p.requires_grad for p in teacher.parameters()] == rg and teacher.training == tr
    assert all(p.grad is None for p in teacher.parameters())
    assert no_hooks(teacher, student, out)
    assert out is not student                                   # a copy unless inplace
    first, last = sum(h['loss'] for h in hist[:8]) / 8, sum(h['loss'] for h in hist[-8:]) / 8
    assert last < factor * first, (first, last)

def test_hooks_removed_on_error():
    teacher, student, data = toy()
    def boom(rec): raise RuntimeError('stop here')
    with pytest.raises(RuntimeError, match='stop here'):
        distill(student, teacher, data, layers='decomposed', on_step=boom, inplace=True)
    assert no_hooks(teacher, student)

def test_deterministic():
    teacher, student, data = toy()
    a = distill(student, teacher, data, epochs=3, lr=1e-3, layers='decomposed', seed=3)
    rng = torch.get_rng_state()
    b = distill(student, teacher, data, epochs=3, lr=1e-3, layers='decomposed', seed=3)
    assert torch.equal(torch.get_rng_state(), rng)              # the caller's random state is left alone
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = distill(student, teacher, data, epochs=3, lr=2e-3, layers='decomposed', seed=3)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))

def test_dict_outputs_and_masks():
    "A model returning a dict and taking keyword batches: `output=` picks the tensor; padded tokens are ignored."
    class M(nn.Module):
        def __init__(self): super().__init__(); self.emb = nn.Embedding(20, 8); self.fc = nn.Linear(8, 8)
        def forward(self, input_ids, attention_mask): return {'hidden': self.fc(self.emb(input_ids)), 'other': torch.zeros(1)}
    torch.manual_seed(0)
    teacher = M(); student = copy.deepcopy(teacher)
    with torch.no_grad(): student.fc.weight.add_(0.1 * torch.randn(8, 8))
    ids = torch.randint(0, 20, (4, 5)); mask = torch.ones(4, 5, dtype=torch.long); mask[:, 3:] = 0
    batch = {'input_ids': ids, 'attention_mask': mask}
    crit = DistillLoss(student, teacher, loss='mse', output='hidden')
    s, t = student(**batch), teacher(**batch)
    t2 = {k: v.clone() for k, v in t.items()}; t2['hidden'][:, 3:] += 100.     # padding positions only
    l1, _ = crit(s, t, ('kwargs', batch)); l2, _ = crit(s, t2, ('kwargs', batch))
    assert torch.allclose(l1, l2)
    out = distill(student, teacher, [batch] * 4, epochs=5, lr=1e-2, output='hidden')
    assert no_hooks(out, teacher)

def test_token_level_output_and_layer():
    """Token by token (how a sentence-embedding model is distilled on `last_hidden_state`): a per-token cosine on the
    output plus a per-token relative MSE on the module that makes it; each part is what it says, padding ignored by both."""
    import torch.nn.functional as F
    class M(nn.Module):
        def __init__(self): super().__init__(); self.emb = nn.Embedding(20, 8); self.fc = nn.Linear(8, 8)
        def forward(self, input_ids, attention_mask): return {'hidden': self.fc(self.emb(input_ids))}
    torch.manual_seed(0)
    teacher = M(); student = copy.deepcopy(teacher)
    with torch.no_grad(): student.fc.weight.add_(0.3 * torch.randn(8, 8))
    ids = torch.randint(0, 20, (4, 5)); mask = torch.ones(4, 5, dtype=torch.long); mask[:, 3:] = 0
    ids2 = ids.clone(); ids2[:, 3:] = (ids[:, 3:] + 7) % 20                    # other tokens at the padded positions only
    crit = DistillLoss(student, teacher, loss='cosine', output='hidden', layers=['fc'], layer_loss='mse').attach()
    def parts(ids_):
        item = ('kwargs', {'input_ids': ids_, 'attention_mask': mask})
        crit.recording = True
        t = crit.teacher_forward(item); s = student(**item[1])
        crit.recording = False
        lo, p = crit(s, t, item)
        return lo, p, s['hidden'].detach(), t['hidden']
    lo, p, s, t = parts(ids)
    m = mask.bool(); sh, th = s[m], t[m]
    assert p['output_loss'] == pytest.approx(1 - F.cosine_similarity(sh, th, dim=-1).mean().item(), rel=1e-5)
    assert p['layer_loss'] == pytest.approx((F.mse_loss(sh, th) / th.pow(2).mean()).item(), rel=1e-5)
    assert lo.item() == pytest.approx(p['output_loss'] + p['layer_loss'], rel=1e-6) and p['layer_loss'] > 0.01
    lo2, p2, s2, _ = parts(ids2)
    assert not torch.equal(s2, s)                                              # the padded positions did change
    assert p2 == pytest.approx(p, rel=1e-6)
    crit.remove(); assert no_hooks(student, teacher)

def test_bad_arguments():
    teacher, student, data = toy()
    with pytest.raises(ValueError, match='same model'): distill(teacher, teacher, data)
    shared = copy.deepcopy(student); shared[0] = teacher[0]
    with pytest.raises(ValueError, match='share'): distill(shared, teacher, data)
    with pytest.raises(ValueError, match="loss must be one of"): distill(student, teacher, data, loss='l1')
    with pytest.raises(ValueError, match="layer_loss must be one of"): distill(student, teacher, data, layers='decomposed', layer_loss='l1')
    with pytest.raises(ValueError, match='nothing to distil'): distill(student, teacher, data, loss=None)
    with pytest.raises(ValueError, match="no module named 'nope'"): distill(student, teacher, data, layers=['nope'])
    with pytest.raises(ValueError, match='epochs must be'): distill(student, teacher, data, epochs=0)
    with pytest.raises(ValueError, match='lr must be'): distill(student, teacher, data, lr=0)
    with pytest.raises(ValueError, match='temperature must be'): distill(student, teacher, data, loss='kl', temperature=0)
    with pytest.raises(ValueError, match="mode must be"): distill(student, teacher, data, mode='test')
    with pytest.raises(TypeError, match='re-iterable'): distill(student, teacher, iter(data))
    with pytest.raises(KeyError, match='no such key'): distill(student, teacher, data, output='logits')
    with pytest.raises(ValueError, match='targets must'): Staged_Decomposer().decompose(teacher, [0.5, 0.7], data)
    assert no_hooks(teacher, student)

def test_merge_blocks_exact_and_staged():
    teacher, student, data = toy()
    merged = merge_blocks(student)
    x = torch.cat(data)
    with torch.no_grad(): assert torch.allclose(merged(x), student(x), atol=1e-5)
    assert not any(isinstance(m, LowRankBlock) for m in merged.modules())
    st = Staged_Decomposer()
    out = st.decompose(teacher, [0.8, 0.6], data, distill_kwargs=dict(epochs=2, lr=1e-3, seed=0))
    assert list(st.schedule.stage) == [0, 1] and list(st.schedule.target) == [0.8, 0.6]
    assert abs(n_params(out) / n_params(teacher) - 0.6) < 0.05 and no_hooks(out, teacher)

def test_fastai_unlabeled_and_labeled():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    teacher, student, data = toy()
    x = torch.cat(data); y = teacher(x).argmax(1).detach()
    before = snapshot(teacher)
    for items in ([(a,) for a in x], list(zip(x, y))):           # no targets; targets (ignored by the loss)
        dls = DataLoaders(DataLoader(items, bs=32, shuffle=True), DataLoader(items, bs=64))
        learn = Learner(dls, copy.deepcopy(student), loss_func=nn.CrossEntropyLoss())
        w0 = [p.detach().clone() for p in learn.model.parameters()]
        with learn.no_bar(), learn.no_logging(): cb = learn.distill(teacher, epochs=2, lr=1e-2, layers='decomposed')
        assert isinstance(learn.loss_func, nn.CrossEntropyLoss) and not hasattr(learn, 'distill_cb')
        assert any(not torch.equal(a, b) for a, b in zip(w0, learn.model.parameters()))   # it trained
        assert no_hooks(teacher, learn.model)
    sd, rg, tr = before
    assert all(torch.equal(sd[k], v) for k, v in teacher.state_dict().items()) and [p.requires_grad for p in teacher.parameters()] == rg

def test_trainable_decomposed():
    "Only the decomposed blocks' parameters move (end to end and local); the frozen ones get requires_grad back."
    teacher, student, data = toy()
    student[0], student[4] = copy.deepcopy(teacher[0]), copy.deepcopy(teacher[4])      # dense layers beside a block
    for kw in (dict(loss='mse'), dict(layers='decomposed', local='teacher')):
        out = distill(student, teacher, data, epochs=2, lr=1e-2, trainable='decomposed', **kw)
        moved = {n for n, p in out.named_parameters() if not torch.equal(p, student.get_parameter(n))}
        assert moved and all(n.startswith('2.') for n in moved), moved
        assert all(p.requires_grad for p in out.parameters())

def test_length_batches():
    "Each item once per pass, batches are runs of the length order (far less padding), a new order each pass, seeded."
    from fasterai.decompose.distill import length_batches
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 60, (1000,), generator=g).tolist()
    rng = torch.get_rng_state()
    bl = length_batches(lens, bs=32, passes=3, seed=1)
    assert torch.equal(rng, torch.get_rng_state())                   # the caller's random state is left alone
    n = -(-1000 // 32)
    assert len(bl) == 3 * n
    for p in range(3): assert sorted(i for b in bl[p * n:(p + 1) * n] for i in b) == list(range(1000))
    spans = sorted((min(lens[i] for i in b), max(lens[i] for i in b)) for b in bl[:n])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))     # no two batches' length ranges overlap
    def padded(bl): return sum(len(b) * max(lens[i] for i in b) for b in bl)
    assert padded(bl[:n]) < 0.8 * padded([list(range(i, min(i + 32, 1000))) for i in range(0, 1000, 32)])
    assert bl[:n] != bl[n:2 * n]                                    # shuffled anew each pass
    assert length_batches(lens, 32, 3, seed=1) == bl and length_batches(lens, 32, 3, seed=2) != bl
    with pytest.raises(ValueError, match='bs must be'): length_batches(lens, bs=0)
    with pytest.raises(ValueError, match='passes must be'): length_batches(lens, passes=0)
    with pytest.raises(ValueError, match='empty'): length_batches([])
