"""``torch.compile(fullgraph=True)`` traces ``nckernels.linear_cross_entropy`` (custom ops with
fake kernels and registered autograd): no graph break, the oracle's values, eager gradients."""
from __future__ import annotations

import pytest
import torch

import nckernels
from oracle import linear_cross_entropy_oracle

# "aot_eager" traces the same joint forward/backward graph as Inductor (dynamo, fake kernels,
# registered autograd) without code generation: the option grid uses it. Inductor on CPU
# compiles C++ (measured here, 2 cores: ~2 min for the first graph with a cold cache, ~25 s
# warm), so one test (marked slow) runs the real thing.
COMPILE_BACKEND = "aot_eager"


def _inputs(lead=(2, 9), V=37, D=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.5
    t = torch.randint(0, V, lead, generator=g)
    t[..., 1] = -100
    cw = torch.rand(V, generator=g) + 0.5
    return x, w, b, t, cw


def _fn(reduction, return_lse, shift, impl):
    def fn(x, w, b, t, cw):
        return nckernels.linear_cross_entropy(
            x, w, t, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
            softcap=5.0, shift=shift, return_lse=return_lse, impl=impl,
        )

    return fn


def _run(fn, x, w, b, t, cw, g_loss, g_lse):
    leaves = [v.clone().requires_grad_() for v in (x, w, b)]
    out = fn(*leaves, t, cw)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    objective = (loss * g_loss).sum() + ((lse * g_lse).sum() if lse is not None else 0)
    objective.backward()
    return loss.detach(), (lse.detach() if lse is not None else None), [v.grad for v in leaves]


@pytest.mark.parametrize("shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("return_lse", [False, True], ids=["loss", "loss+lse"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph(reduction, return_lse, shift):
    _check_compiled(reduction, return_lse, shift, COMPILE_BACKEND)


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("mean", True, True, "inductor")


def _check_compiled(reduction, return_lse, shift, backend):
    torch._dynamo.reset()
    x, w, b, t, cw = _inputs()
    fn = _fn(reduction, return_lse, shift, "reference")
    compiled = torch.compile(fn, fullgraph=True, backend=backend)

    tok_shape = t[..., 1:].shape if shift else t.shape
    gen = torch.Generator().manual_seed(1)
    g_loss = torch.randn(tok_shape, generator=gen) if reduction == "none" else torch.tensor(0.7)
    g_lse = torch.randn(tok_shape, generator=gen)

    loss_c, lse_c, grads_c = _run(compiled, x, w, b, t, cw, g_loss, g_lse)
    loss_e, lse_e, grads_e = _run(fn, x, w, b, t, cw, g_loss, g_lse)

    loss_o, lse_o = linear_cross_entropy_oracle(x, w, t, linear_bias=b, weight=cw, reduction=reduction,
                                                label_smoothing=0.1, z_loss=1e-3, softcap=5.0, shift=shift)
    torch.testing.assert_close(loss_c.double(), loss_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    if return_lse:
        torch.testing.assert_close(lse_c.double(), lse_o, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse_c, lse_e, rtol=1e-6, atol=1e-7)
    for name, gc, ge in zip(("input", "linear_weight", "linear_bias"), grads_c, grads_e):
        assert gc is not None, f"no gradient for {name} through the compiled function"
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7, msg=lambda m: f"d {name}: {m}")


def test_compile_auto_impl_and_new_shape():
    """impl="auto" (the default users hit) also traces without a graph break; a second call with
    another number of tokens recompiles or runs dynamically, and stays right."""
    torch._dynamo.reset()
    fn = _fn("sum", False, False, "auto")
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    for lead in ((2, 9), (3, 5)):
        x, w, b, t, cw = _inputs(lead=lead, seed=len(lead) + lead[0])
        loss_c, _, grads_c = _run(compiled, x, w, b, t, cw, torch.tensor(1.0), None)
        loss_e, _, grads_e = _run(fn, x, w, b, t, cw, torch.tensor(1.0), None)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        for gc, ge in zip(grads_c, grads_e):
            torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)
