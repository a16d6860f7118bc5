"""``kernels.linear_reduce.linear_argmax`` (Triton; the interpreter on CPU) against ``torch.argmax``
of the float64 logits.

Two kinds of input: small integers (exact in fp16 and fp32, and so are their fp32 dot products:
the kernel's logits equal the oracle's bit for bit, ties included, so the tie rule is tested
exactly), and Gaussian inputs whose rows all have a clear top-1 margin (rounding cannot flip the
winner). CPU tiles are 32 x 32 and the vocabulary is split across programs, so C = 150..300 runs
several tiles and splits (the host merge of the splits is exercised too).
"""
from __future__ import annotations

import pytest
import torch

from nckernels.kernels.linear_reduce import linear_argmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def oracle(x, w, bias=None):
    z = x.double().cpu() @ w.double().cpu().T
    if bias is not None:
        z = z + bias.double().cpu()
    z = torch.where(z.isnan(), float("-inf"), z)  # NaN never wins
    out = z.argmax(1) if z.shape[1] else torch.full((z.shape[0],), -1)
    if z.shape[1]:
        out[(z == float("-inf")).all(1)] = -1
    return out


def integer_case(N, C, D, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (N, D), generator=g).to(DEVICE, dtype)
    w = torch.randint(-3, 4, (C, D), generator=g).to(DEVICE, dtype)
    b = torch.randint(-4, 5, (C,), generator=g).float().to(DEVICE) if bias else None
    return x, w, b


def margin_case(N, C, D, dtype, seed=0, margin=0.5):
    """Gaussian logits of std ~3, and each row's winner pushed ``margin`` above the runner-up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) * (3 / D**0.5)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    xq, wq = x.to(dtype).double(), w.to(dtype).double()
    top2 = (xq @ wq.T + b).topk(min(2, C), dim=1)
    # lift each row's winner by raising its bias above the runner-up of every row it wins
    for j in top2.indices[:, 0].unique():
        rows = top2.indices[:, 0] == j
        need = (top2.values[rows, 1] + margin - top2.values[rows, 0]).max() if C > 1 else 0.0
        b[j] += max(float(need), 0.0)
    z = xq @ wq.T + b
    top2 = z.topk(min(2, C), dim=1).values
    keep = (top2[:, 0] - top2[:, -1] >= margin * 0.99) | (C == 1)
    assert keep.float().mean() > 0.6, "test data: too few rows with a clear margin"
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), b.float().to(DEVICE), keep


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C,D", [(1, 150, 16), (37, 150, 24), (70, 33, 48), (200, 300, 17), (5, 1, 8)])
def test_integer_inputs_exact_with_ties(N, C, D, dtype):
    x, w, b = integer_case(N, C, D, dtype, seed=N + C)
    assert torch.equal(linear_argmax(x, w, b).cpu(), oracle(x, w, b))
    assert torch.equal(linear_argmax(x, w).cpu(), oracle(x, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,C,D", [(1, 200, 32), (45, 170, 40), (96, 64, 20)])
def test_gaussian_inputs_with_margin(N, C, D, dtype):
    x, w, b, keep = margin_case(N, C, D, dtype, seed=N * C)
    got = linear_argmax(x, w, b).cpu()
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert torch.equal(got[keep], oracle(x, w, b)[keep])


def test_ties_take_the_smallest_index():
    """Identical classes everywhere: every row's winner is the first of its tied maxima, also when
    the ties sit in different tiles and vocabulary splits."""
    D, C = 8, 200
    w = torch.zeros(C, D, device=DEVICE)
    w[[13, 77, 140, 199]] = 1.0  # four identical best classes
    x = torch.ones(33, D, device=DEVICE)
    assert torch.equal(linear_argmax(x, w).cpu(), torch.full((33,), 13))
    b = torch.zeros(C, device=DEVICE)
    b[13] = float("-inf")
    assert torch.equal(linear_argmax(x, w, b).cpu(), torch.full((33,), 77))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_with_minus_inf_and_nan(dtype):
    """-inf classes never win (nearest-class-mean with excluded classes), NaN logits never win, and
    a row whose classes are all -inf gets -1."""
    N, C, D = 40, 130, 16
    x, w, b = integer_case(N, C, D, dtype, seed=3)
    z = oracle(x, w, b)
    b[z.unique().to(DEVICE)] = float("-inf")  # exclude every current winner
    b[5] = float("nan")
    got = linear_argmax(x, w, b).cpu()
    assert torch.equal(got, oracle(x, w, b))
    assert not torch.isin(got, z.unique()).any() and (got != 5).all()
    assert torch.equal(linear_argmax(x, w, torch.full((C,), float("-inf"), device=DEVICE)).cpu(),
                       torch.full((N,), -1))


def test_degenerate_shapes():
    x = torch.randn(4, 8, device=DEVICE)
    assert torch.equal(linear_argmax(x, torch.empty(0, 8, device=DEVICE)).cpu(), torch.full((4,), -1))
    assert linear_argmax(torch.empty(0, 8, device=DEVICE), torch.randn(9, 8, device=DEVICE)).shape == (0,)
    b = torch.randn(50, device=DEVICE)  # D = 0: the logits are the bias
    got = linear_argmax(torch.empty(3, 0, device=DEVICE), torch.empty(50, 0, device=DEVICE), b)
    assert torch.equal(got.cpu(), torch.full((3,), int(b.argmax())))


def test_strided_input():
    x, w, b = integer_case(30, 90, 16, torch.float32, seed=9)
    xt = x.T.contiguous().T  # column-major
    assert torch.equal(linear_argmax(xt, w[::1], b).cpu(), oracle(x, w, b))
