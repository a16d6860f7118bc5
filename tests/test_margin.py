"""Margin losses (CosFace, ArcFace, combined, class-level and pair-wise Circle) against float64 oracles.

The reference backend runs with the chunk budget forced tiny (``NCKERNELS_REFERENCE_CHUNK_MB``), so
every loss is computed over several class chunks with the online log-sum-exp; the oracle
(tests/oracle_margin.py) builds the full ``B x C`` cosines in float64 and differentiates the
papers' formulas with autograd. Tolerances are relative to the largest magnitude of each
oracle tensor.
"""
from __future__ import annotations

import math

import pytest
import torch

import nckernels
from nckernels import ArcFaceLoss, CircleLoss, CombinedMarginLoss, CosFaceLoss, PairCircleLoss
from nckernels.reference import margin as margin_ref
from oracle_margin import margin_oracle, pair_circle_oracle

B, C, D = 7, 37, 12
TINY_MB = "0.002"  # ~2 KiB: 9 classes per chunk at B=7, D=12 -> 5 chunks for C=37


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    monkeypatch.setenv("NCKERNELS_REFERENCE_CHUNK_MB", TINY_MB)
    monkeypatch.delenv("NCKERNELS_IMPL", raising=False)


def make_case(seed=0, *, B=B, C=C, D=D, ignore=(), overflow_rows=(), dtype=torch.float32):
    """Random embeddings / centres (unnormalised, various norms) and targets; rows in ``overflow_rows``
    point nearly opposite their centre (``cos_t < -0.9``, so ``theta + 0.5 > pi``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g))
    e = torch.randn(B, D, generator=g) * (0.5 + 2 * torch.rand(B, 1, generator=g))
    t = torch.randint(0, C, (B,), generator=g)
    for i in overflow_rows:
        e[i] = -w[t[i]] * 1.7 + 0.05 * torch.randn(D, generator=g)
    for i in ignore:
        t[i] = -100
    return e.to(dtype), w, t


def run_both(fn, oracle_kw, e, w, t, reduction="mean", **kw):
    """(ours, oracle) as ``(loss, d_embeddings, d_weight)``; the upstream gradient is random for 'none'."""
    e1, w1 = e.clone().requires_grad_(), w.clone().requires_grad_()
    e2, w2 = e.double().requires_grad_(), w.double().requires_grad_()
    ours = fn(e1, w1, t, reduction=reduction, **kw)
    ref = margin_oracle(e2, w2, t, reduction=reduction, **oracle_kw)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (ours * up.to(ours.dtype)).sum().backward()
    (ref * up).sum().backward()
    return (ours, e1.grad, w1.grad), (ref, e2.grad, w2.grad)


def assert_close(actual, expected, tol, what):
    a, x = actual.detach().double(), expected.detach().double()
    assert a.shape == x.shape, f"{what}: shape {tuple(a.shape)} != {tuple(x.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a}"
    scale = max(x.abs().max().item(), 1e-30)
    err = (a - x).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def check(ours, ref, tol=2e-4):
    for a, x, name in zip(ours, ref, ("loss", "d_embeddings", "d_weight")):
        assert_close(a, x, tol, name)


def test_chunks_are_exercised():
    chunks = list(margin_ref._class_chunks(B, C, D, margin_ref.chunk_bytes()))
    assert len(chunks) >= 4 and chunks[-1][1] == C


def test_no_b_by_c_logits(monkeypatch):
    """Forward and backward only ever transform (B, cols) chunks of the cosines, cols < C."""
    shapes = []
    orig = margin_ref.other_logits

    def spy(c, *a):
        shapes.append(tuple(c.shape))
        return orig(c, *a)

    monkeypatch.setattr(margin_ref, "other_logits", spy)
    e, w, t = make_case(14, C=200)
    e.requires_grad_()
    nckernels.arcface_loss(e, w, t).backward()
    cols = max(s[1] for s in shapes)
    assert cols < 200 // 4 and sum(s[1] for s in shapes) == 2 * 200, shapes


def test_torch_compile_fullgraph():
    e, w, t = make_case(15, ignore=(1,))
    fn = torch.compile(lambda e, w, t: nckernels.arcface_loss(e, w, t, scale=16.0), backend="aot_eager",
                       fullgraph=True)
    leaves = [e.clone().requires_grad_(), w.clone().requires_grad_()]
    loss = fn(*leaves, t)
    loss.backward()
    eager = [e.clone().requires_grad_(), w.clone().requires_grad_()]
    ref = nckernels.arcface_loss(*eager, t, scale=16.0)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cosface(reduction):
    e, w, t = make_case(1, ignore=(2,))
    check(*run_both(nckernels.cosface_loss, dict(kind="cosface", margin=0.35), e, w, t, reduction, margin=0.35))


@pytest.mark.parametrize("gradient", ["exact", "insightface"])
@pytest.mark.parametrize("theta_overflow", ["fallback", "clamp", "none"])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_arcface(gradient, theta_overflow, easy_margin):
    e, w, t = make_case(2, ignore=(4,), overflow_rows=(0, 3))
    cos_t = torch.nn.functional.cosine_similarity(e[[0, 3]], w[t[[0, 3]]])
    assert (torch.acos(cos_t) + 0.5 > math.pi).all()  # the policies are really exercised
    kw = dict(margin=0.5, easy_margin=easy_margin, theta_overflow=theta_overflow, gradient=gradient)
    ours, ref = run_both(nckernels.arcface_loss, dict(kind="arcface", scale=30.0, **kw), e, w, t, "none",
                         scale=30.0, **kw)
    check(ours, ref)


def test_arcface_gradient_modes_differ_and_policies_differ():
    e, w, t = make_case(3, overflow_rows=(1,))
    out = {}
    for grad in ("exact", "insightface"):
        for pol in ("fallback", "clamp", "none"):
            e1 = e.clone().requires_grad_()
            loss = nckernels.arcface_loss(e1, w, t, theta_overflow=pol, gradient=grad, reduction="none")
            loss.sum().backward()
            out[grad, pol] = (loss.detach(), e1.grad)
    assert not torch.allclose(out["exact", "none"][1], out["insightface", "none"][1])
    assert torch.equal(out["exact", "none"][0], out["insightface", "none"][0])  # same forward
    for a, b in (("fallback", "clamp"), ("clamp", "none"), ("fallback", "none")):
        assert not torch.allclose(out["exact", a][0][1], out["exact", b][0][1])  # row 1 overflows


@pytest.mark.parametrize("theta_overflow", ["fallback", "clamp", "none"])
@pytest.mark.parametrize("gradient", ["exact", "insightface"])
def test_combined_margin_all_three(theta_overflow, gradient):
    e, w, t = make_case(4, ignore=(5,), overflow_rows=(2,))
    kw = dict(m1=1.15, m2=0.3, m3=0.2, theta_overflow=theta_overflow, gradient=gradient)
    check(*run_both(nckernels.combined_margin_loss, dict(kind="combined", scale=16.0, **kw), e, w, t, "mean",
                   scale=16.0, **kw))


def test_combined_reduces_to_arcface_and_cosface():
    e, w, t = make_case(5)
    arc = nckernels.arcface_loss(e, w, t, margin=0.4, reduction="none")
    comb = nckernels.combined_margin_loss(e, w, t, m1=1.0, m2=0.4, m3=0.0, reduction="none")
    torch.testing.assert_close(arc, comb)
    cos = nckernels.cosface_loss(e, w, t, margin=0.3, reduction="none")
    comb = nckernels.combined_margin_loss(e, w, t, m1=1.0, m2=0.0, m3=0.3, reduction="none")
    torch.testing.assert_close(cos, comb, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_circle_alpha_detached(reduction):
    e, w, t = make_case(6, ignore=(0,))
    kw = dict(gamma=32.0, margin=0.25)
    ours, ref = run_both(nckernels.circle_loss, dict(kind="circle", scale=32.0, margin=0.25), e, w, t, reduction, **kw)
    check(ours, ref)
    # and the gradient really is the detached one: undetached alphas give a different gradient
    e2 = e.double().requires_grad_()
    cos = torch.nn.functional.normalize(e2) @ torch.nn.functional.normalize(w.double()).T
    y = torch.nn.functional.one_hot(t.clamp_min(0), C).bool()
    z = torch.where(y, 32 * torch.relu(1.25 - cos) * (cos - 0.75), 32 * torch.relu(cos + 0.25) * (cos - 0.25))
    ((torch.logsumexp(z, 1) - z[y]) * (t >= 0)).sum().backward()
    assert not torch.allclose(e2.grad, ref[1] if reduction == "none" else ref[1] * 6, rtol=1e-3)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_circle(reduction):
    g = torch.Generator().manual_seed(7)
    e = torch.randn(12, 6, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 0, 5, 2])  # classes 4 and 5: no positive
    e1, e2 = e.clone().requires_grad_(), e.double().requires_grad_()
    ours = nckernels.pair_circle_loss(e1, labels, gamma=80.0, margin=0.4, reduction=reduction)
    ref = pair_circle_oracle(e2, labels, gamma=80.0, margin=0.4, reduction=reduction)
    ours.sum().backward()
    ref.sum().backward()
    assert_close(ours, ref, 1e-4, "loss")
    assert_close(e1.grad, e2.grad, 1e-4, "d_embeddings")
    assert e1.grad[[8, 10]].abs().max() > 0  # a lone anchor still receives gradient as a negative


def test_pair_circle_no_valid_anchor_is_zero():
    e = torch.randn(3, 4, requires_grad=True)
    loss = nckernels.pair_circle_loss(e, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0 and torch.equal(e.grad, torch.zeros_like(e))
    assert nckernels.pair_circle_loss(e, torch.tensor([1, 1, 1])).item() == 0  # no negatives


# ----------------------------------------------------------------------------- edges


def _all_losses():
    return [
        ("cosface", lambda e, w, t, **k: nckernels.cosface_loss(e, w, t, **k)),
        ("arcface", lambda e, w, t, **k: nckernels.arcface_loss(e, w, t, **k)),
        ("arcface-none-exact", lambda e, w, t, **k: nckernels.arcface_loss(e, w, t, theta_overflow="none", **k)),
        ("arcface-clamp", lambda e, w, t, **k: nckernels.arcface_loss(e, w, t, theta_overflow="clamp", **k)),
        ("arcface-easy", lambda e, w, t, **k: nckernels.arcface_loss(e, w, t, easy_margin=True, **k)),
        ("combined", lambda e, w, t, **k: nckernels.combined_margin_loss(e, w, t, m1=1.1, m2=0.3, m3=0.1,
                                                                         theta_overflow="none", **k)),
        ("circle", lambda e, w, t, **k: nckernels.circle_loss(e, w, t, **k)),
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,fn", _all_losses(), ids=[n for n, _ in _all_losses()])
def test_edges_cos_plus_minus_one_finite(name, fn, dtype):
    """Embeddings equal to their centre or its negation (cos = +-1 exactly, up to rounding), in low
    precision: finite loss and gradients."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(5, 16, generator=g).to(dtype).float()  # representable in the embeddings' dtype
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    e = torch.stack([w[0], -w[1], w[2] * 3, -w[3] * 0.25, w[4], -w[0]]).to(dtype).requires_grad_()
    wp = w.clone().requires_grad_()
    for red in ("mean", "none"):
        loss = fn(e, wp, t, reduction=red)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), (name, red, loss)
        loss.sum().backward()
        assert e.grad.dtype == dtype and torch.isfinite(e.grad).all(), (name, red, e.grad)
        assert torch.isfinite(wp.grad).all(), (name, red)
        e.grad = wp.grad = None
    # and a bf16 weight
    wb = w.bfloat16().requires_grad_()
    fn(e, wb, t).backward()
    assert wb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad).all()


def test_exact_gradient_bounded_near_cos_one():
    """theta -> 0: the factor sin(theta + m) / sin(theta) blows up, the gradient w.r.t. the raw
    embedding does not (the projection of w_hat orthogonal to e_hat shrinks like sin(theta))."""
    w = torch.zeros(3, 8)
    w[0, 0] = w[1, 1] = w[2, 2] = 1.0
    for eps in (1e-2, 1e-3, 3e-4, 0.0):
        e = torch.zeros(1, 8)
        e[0, 0], e[0, 3] = 1.0, eps
        e.requires_grad_()
        nckernels.arcface_loss(e, w, torch.tensor([0]), scale=10.0).backward()
        assert torch.isfinite(e.grad).all() and e.grad.abs().max() < 50, (eps, e.grad)


def test_theta_near_pi_finite_all_policies():
    w = torch.eye(4)
    e = torch.tensor([[-1.0, 1e-4, 0, 0], [-1.0, 0, 0, 0]], requires_grad=True)
    for pol in ("fallback", "clamp", "none"):
        for grad in ("exact", "insightface"):
            loss = nckernels.arcface_loss(e, w, torch.tensor([0, 0]), theta_overflow=pol, gradient=grad)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(e.grad).all(), (pol, grad)
            e.grad = None


def test_b1_c1_and_all_ignored():
    e = torch.randn(1, 5, requires_grad=True)
    w = torch.randn(1, 5, requires_grad=True)
    t = torch.tensor([0])
    for fn in (nckernels.cosface_loss, nckernels.arcface_loss, nckernels.circle_loss):
        loss = fn(e, w, t)  # one class: softmax over one logit, loss 0, zero gradient
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e)), fn.__name__
        e.grad = w.grad = None
    e2, w2, t2 = make_case(9, B=1, C=3)
    check(*run_both(nckernels.arcface_loss, dict(kind="arcface", margin=0.5), e2, w2, t2, "mean"))
    # all ignored: NaN mean (like PyTorch), 0 sum, zero gradients
    e3 = torch.randn(4, 5, requires_grad=True)
    w3 = torch.randn(6, 5, requires_grad=True)
    t3 = torch.full((4,), -1)
    loss = nckernels.cosface_loss(e3, w3, t3, ignore_index=-1)
    assert torch.isnan(loss)
    s = nckernels.arcface_loss(e3, w3, t3, ignore_index=-1, reduction="sum")
    s.backward()
    assert s.item() == 0 and torch.equal(e3.grad, torch.zeros_like(e3)) and torch.equal(w3.grad, torch.zeros_like(w3))
    none = nckernels.circle_loss(e3, w3, t3, ignore_index=-1, reduction="none")
    assert torch.equal(none, torch.zeros(4))


def test_bad_inputs():
    e, w, t = make_case(10)
    f = nckernels.arcface_loss
    with pytest.raises(ValueError, match="target"):
        f(e, w, torch.tensor([0, 1, 2, 3, 4, 5, C]))
    with pytest.raises(ValueError, match="target"):
        f(e, w, torch.tensor([0, 1, 2, 3, 4, 5, -3]))
    with pytest.raises(TypeError, match="target"):
        f(e, w, t.float())
    with pytest.raises(ValueError, match="target shape"):
        f(e, w, t[:3])
    with pytest.raises(ValueError, match="features"):
        f(e, w[:, :5], t)
    with pytest.raises(ValueError, match="embeddings"):
        f(e[0], w, t)
    with pytest.raises(TypeError, match="embeddings"):
        f(e.long(), w, t)
    with pytest.raises(ValueError, match="scale"):
        f(e, w, t, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        nckernels.cosface_loss(e, w, t, scale=-1.0)
    with pytest.raises(ValueError, match="margin"):
        f(e, w, t, margin=4.0)
    with pytest.raises(ValueError, match="margin"):
        nckernels.cosface_loss(e, w, t, margin=-0.1)
    with pytest.raises(ValueError, match="margin"):
        nckernels.circle_loss(e, w, t, margin=1.5)
    with pytest.raises(ValueError, match="gamma"):
        nckernels.circle_loss(e, w, t, gamma=0)
    with pytest.raises(ValueError, match="theta_overflow"):
        f(e, w, t, theta_overflow="wrap")
    with pytest.raises(ValueError, match="gradient"):
        f(e, w, t, gradient="approx")
    with pytest.raises(TypeError, match="easy_margin"):
        f(e, w, t, easy_margin="yes")
    with pytest.raises(ValueError, match="m1"):
        nckernels.combined_margin_loss(e, w, t, m1=0.0)
    with pytest.raises(ValueError, match="m3"):
        nckernels.combined_margin_loss(e, w, t, m3=float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        f(e, w, t, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        f(e, w, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="impl"):
        f(e, w, t, impl="cpp")
    with pytest.raises(ValueError, match="labels"):
        nckernels.pair_circle_loss(e, t[:2])
    with pytest.raises(TypeError, match="labels"):
        nckernels.pair_circle_loss(e, t.float())
    with pytest.raises(ValueError, match="num_classes"):
        ArcFaceLoss(0, 8)


def test_custom_op_registration():
    from nckernels.ops.margin import margin_ce_forward

    e, w, t = make_case(11, B=4, C=6, D=5, ignore=(1,))
    args = (e.requires_grad_(), w.requires_grad_(), t, "combined", 16.0, 1.0, 0.5, 0.0, False, "fallback", "exact",
            -100, "reference")
    # aot_dispatch is covered by test_torch_compile_fullgraph
    torch.library.opcheck(margin_ce_forward, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ----------------------------------------------------------------------------- modules


@pytest.mark.parametrize("cls,kw,oracle_kw", [
    (CosFaceLoss, {}, dict(kind="cosface", margin=0.35)),
    (ArcFaceLoss, {}, dict(kind="arcface", margin=0.5)),
    (CombinedMarginLoss, dict(m1=1.1, m2=0.2, m3=0.1), dict(kind="combined", m1=1.1, m2=0.2, m3=0.1)),
    (CircleLoss, {}, dict(kind="circle", scale=256.0, margin=0.25)),
])
def test_modules_fp32_weight_under_bf16_autocast(cls, kw, oracle_kw):
    torch.manual_seed(12)
    net = torch.nn.Linear(10, D)
    head = cls(C, D, ignore_index=-1, **kw)
    assert head.weight.dtype == torch.float32 and isinstance(head.weight, torch.nn.Parameter)
    x = torch.randn(B, 10)
    t = torch.randint(0, C, (B,))
    t[3] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, t)
    assert loss.dtype == torch.float32 and head.weight.dtype == torch.float32
    loss.backward()
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
    assert torch.isfinite(net.weight.grad).all()
    # the loss of the bf16 embeddings, computed in fp32 against the fp32 centres
    ref = margin_oracle(emb.detach().double(), head.weight.detach().double(), t, ignore_index=-1,
                        **({"scale": 64.0} | oracle_kw))
    assert abs(loss.item() - ref.item()) <= 2e-4 * abs(ref.item())
    assert "num_classes=37" in repr(head)


def test_pair_circle_module():
    e = torch.randn(8, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = PairCircleLoss(gamma=64.0, margin=0.25)
    torch.testing.assert_close(m(e, labels), nckernels.pair_circle_loss(e, labels, gamma=64.0, margin=0.25))


# ----------------------------------------------------------------------------- learning


def _clusters(n_per_class, g, num_classes=10, dim=16):
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g))
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + 0.35 * torch.randn(len(y), dim, generator=g)
    return torch.nn.functional.normalize(x), y, centres


@pytest.mark.parametrize("name", ["cosface", "arcface", "combined", "circle", "pair_circle"])
def test_learning_on_hypersphere_clusters(name, monkeypatch, one_thread):
    monkeypatch.setenv("NCKERNELS_REFERENCE_CHUNK_MB", "0.005" if name != "pair_circle" else "0.05")  # 2 chunks
    g = torch.Generator().manual_seed(13)
    x, y, centres = _clusters(40, g)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    # a random rotation-ish linear map scrambles the input first, so the net must learn
    torch.manual_seed(13)
    net = torch.nn.Linear(16, 12, bias=False)
    heads = {
        "cosface": CosFaceLoss(10, 12, scale=16.0, margin=0.2),
        "arcface": ArcFaceLoss(10, 12, scale=16.0, margin=0.3),
        "combined": CombinedMarginLoss(10, 12, scale=16.0, m1=1.0, m2=0.2, m3=0.1),
        "circle": CircleLoss(10, 12, gamma=32.0, margin=0.25),
        "pair_circle": PairCircleLoss(gamma=32.0, margin=0.25),
    }
    head = heads[name]
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=1e-2)
    for step in range(150):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        loss = head(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        emb_tr = torch.nn.functional.normalize(net(xtr))
        emb_te = torch.nn.functional.normalize(net(xte))
        if name == "pair_circle":
            cls_centres = torch.stack([emb_tr[ytr == c].mean(0) for c in range(10)])
        else:
            cls_centres = head.weight
        pred = (emb_te @ torch.nn.functional.normalize(cls_centres).T).argmax(1)
    acc = (pred == yte).float().mean().item()
    print(f"{name}: held-out nearest-centre accuracy {acc:.3f}")
    assert acc > 0.6, f"{name}: held-out nearest-centre accuracy {acc:.2f} (chance 0.10)"
