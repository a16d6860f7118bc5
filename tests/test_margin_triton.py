"""The Triton margin losses (cosine logit transforms on kernels/linear_reduce.py) against float64 oracles.

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest), with
shapes whose class count is not a multiple of the 32-wide test tiles, so every kernel sees
masked columns; fp16 stands in for bf16 there (``tl.dot`` on bf16 is wrong in the interpreter).
The same tests run on CUDA tensors on a GPU machine.
"""
from __future__ import annotations

import pytest
import torch

import nckernels
from nckernels.reference import margin as margin_ref
from oracle_margin import margin_oracle, pair_circle_oracle
from test_margin import check, make_case, run_both

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
C_ODD = 45  # two 32-wide class tiles, the second one partly masked

LOSSES = {
    "cosface": (nckernels.cosface_loss, dict(margin=0.35), dict(kind="cosface", margin=0.35)),
    "arcface": (nckernels.arcface_loss, dict(margin=0.5), dict(kind="arcface", margin=0.5)),
    "arcface-insightface-clamp": (nckernels.arcface_loss, dict(margin=0.5, gradient="insightface",
                                                               theta_overflow="clamp"),
                                  dict(kind="arcface", margin=0.5, gradient="insightface", theta_overflow="clamp")),
    "arcface-easy-none": (nckernels.arcface_loss, dict(margin=0.5, easy_margin=True, theta_overflow="none"),
                          dict(kind="arcface", margin=0.5, easy_margin=True, theta_overflow="none")),
    "combined": (nckernels.combined_margin_loss, dict(m1=1.1, m2=0.3, m3=0.1),
                 dict(kind="combined", m1=1.1, m2=0.3, m3=0.1)),
    "circle": (nckernels.circle_loss, dict(gamma=32.0, margin=0.25), dict(kind="circle", scale=32.0, margin=0.25)),
}


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.fixture(autouse=True)
def triton_only(monkeypatch):
    """Fail loudly if the Triton path falls back to the reference's class chunks."""
    monkeypatch.delenv("NCKERNELS_IMPL", raising=False)

    def forbidden(*_, **__):
        raise AssertionError("the triton backend called the reference's class-chunk loop")

    monkeypatch.setattr(margin_ref, "others_lse", forbidden)
    monkeypatch.setattr(margin_ref, "others_backward", forbidden)
    monkeypatch.setattr(margin_ref, "pair_circle", forbidden)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_oracle_fp32(name, reduction):
    fn, kw, oracle_kw = LOSSES[name]
    e, w, t = _on_device(*make_case(21, B=9, C=C_ODD, ignore=(4,), overflow_rows=(0, 7)))
    check(*run_both(fn, dict(scale=16.0, **oracle_kw) if "scale" not in oracle_kw else oracle_kw, e, w, t, reduction,
                    impl="triton", **({} if name == "circle" else dict(scale=16.0)), **kw), tol=2e-5)


def test_fp16_embeddings_fp32_centres():
    """Low-precision rows multiply in fp16 (the W tiles are cast in the kernel; no copy), accumulate in
    fp32; gradients come back in each input's dtype."""
    e, w, t = _on_device(*make_case(22, B=9, C=C_ODD, ignore=(2,), dtype=torch.float16))
    ours, ref = run_both(nckernels.arcface_loss, dict(kind="arcface", scale=16.0, margin=0.5), e, w, t, "mean",
                         impl="triton", scale=16.0, margin=0.5)
    assert ours[1].dtype == torch.float16 and ours[2].dtype == torch.float32
    check(ours, ref, tol=2e-2)


def test_deterministic_mode_is_bitwise_reproducible(deterministic):
    """Under ``torch.use_deterministic_algorithms`` the backward runs the two exclusive-ownership
    kernels (no atomics): two runs agree bit for bit, and with the oracle."""
    e, w, t = _on_device(*make_case(23, B=5, C=C_ODD, ignore=(1,)))
    runs = [run_both(nckernels.circle_loss, dict(kind="circle", scale=32.0, margin=0.25), e, w, t, "sum",
                     impl="triton", gamma=32.0, margin=0.25) for _ in range(2)]
    check(*runs[0], tol=2e-5)
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)


def test_nan_padded_views():
    """Embeddings and centres are views into NaN-filled buffers (padding after each row and after the
    last one): a load that strays outside its mask poisons the result."""
    e, w, t = make_case(24, B=6, C=C_ODD, ignore=(3,))
    eb = torch.full((9, e.shape[1] + 5), float("nan"))
    eb[:6, : e.shape[1]] = e
    wb = torch.full((C_ODD + 7, w.shape[1] + 3), float("nan"))
    wb[:C_ODD, : w.shape[1]] = w
    e_view, w_view = _on_device(eb[:6, : e.shape[1]], wb[:C_ODD, : w.shape[1]])
    ours = nckernels.cosface_loss(e_view, w_view, t.to(DEVICE), scale=16.0, reduction="none", impl="triton")
    ref = margin_oracle(e.double(), w.double(), t, kind="cosface", scale=16.0, margin=0.35, reduction="none")
    torch.testing.assert_close(ours.cpu().double(), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["cosface", "arcface", "circle"])
def test_edges(name):
    """One class (no other logit: ``lse^o = -inf``, loss 0, zero gradient); one row; every row
    ignored (NaN mean like PyTorch, zero gradients); cos = +-1 exactly in fp16."""
    fn, kw, oracle_kw = LOSSES[name]
    e1, w1 = (x.requires_grad_() for x in _on_device(torch.randn(3, 8), torch.randn(1, 8)))
    loss = fn(e1, w1, torch.zeros(3, dtype=torch.long, device=DEVICE), impl="triton", **kw)
    loss.backward()
    assert loss.item() == 0.0 and not e1.grad.any() and not w1.grad.any()
    check(*run_both(fn, oracle_kw, *_on_device(*make_case(25, B=1, C=C_ODD)), "mean", impl="triton", **kw), tol=2e-5)
    e3, w3 = (x.requires_grad_() for x in _on_device(torch.randn(4, 8), torch.randn(6, 8)))
    t3 = torch.full((4,), -100, device=DEVICE)
    assert torch.isnan(fn(e3, w3, t3, impl="triton", **kw))
    fn(e3, w3, t3, reduction="sum", impl="triton", **kw).backward()
    assert not e3.grad.any() and not w3.grad.any()
    w = torch.randn(5, 16).half().float()
    e = torch.stack([w[0], -w[1], 3 * w[2], -0.25 * w[3], w[4]]).half()
    e, w = (x.requires_grad_() for x in _on_device(e, w))
    loss = fn(e, w, torch.arange(5, device=DEVICE), impl="triton", **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all() and torch.isfinite(w.grad).all()


# ----------------------------------------------------------------------------- pair-wise Circle


def _pair_case(seed, B, D, num_labels, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (B,), generator=g)
    labels[0] = num_labels + 7  # a singleton: no positive, excluded from the mean
    return (torch.randn(B, D, generator=g) * (0.5 + torch.rand(B, 1, generator=g))).to(dtype), labels


@pytest.mark.parametrize("B,D,dtype,tol", [(37, 12, torch.float32, 5e-5), (70, 20, torch.float32, 5e-5),
                                           (33, 16, torch.float16, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_circle_matches_oracle(B, D, dtype, tol, reduction):
    """B not a multiple of the 32-wide tiles (two tiles in each direction: the symmetric backward
    pairs a row tile with every column tile)."""
    e, labels = _pair_case(B, B, D, 5, dtype)
    e1 = e.to(DEVICE).clone().requires_grad_()
    e2 = e.double().requires_grad_()
    ours = nckernels.pair_circle_loss(e1, labels.to(DEVICE), gamma=80.0, margin=0.4, reduction=reduction,
                                      impl="triton")
    ref = pair_circle_oracle(e2, labels, gamma=80.0, margin=0.4, reduction=reduction)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (ours * up.to(DEVICE, torch.float32)).sum().backward()
    (ref * up).sum().backward()
    assert e1.grad.dtype == dtype
    check((ours.cpu(), e1.grad.cpu()), (ref, e2.grad), tol=tol)


def test_pair_circle_no_valid_anchor_and_determinism():
    """All labels equal (no negatives) or all distinct (no positives): loss 0 and a zero gradient; the
    backward has no atomics: two runs agree bit for bit."""
    for labels in (torch.zeros(9, dtype=torch.long), torch.arange(9)):
        e = torch.randn(9, 6, device=DEVICE, requires_grad=True)
        loss = nckernels.pair_circle_loss(e, labels.to(DEVICE), impl="triton")
        loss.backward()
        assert loss.item() == 0.0 and not e.grad.any()
    e, labels = _pair_case(31, 40, 8, 4)
    grads = []
    for _ in range(2):
        leaf = e.to(DEVICE).requires_grad_()
        nckernels.pair_circle_loss(leaf, labels.to(DEVICE), impl="triton").backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
