"""Optimizers: ⊥Grad (OrthoGrad) from Prieto et al. 2025, "Grokking at the Edge of Numerical Stability".

⊥Grad keeps training from following the *naive loss minimisation* direction -- scaling the
weights up, which lowers a cross-entropy loss without changing predictions and drives the
logits into Softmax Collapse -- by removing from each parameter's gradient its component
along the parameter itself, then handing the result to any ``torch.optim`` optimizer.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

__all__ = ["OrthoGrad"]


class OrthoGrad(torch.optim.Optimizer):
    r"""⊥Grad: project every gradient orthogonal to its parameter, then step a base optimizer.

    For each parameter ``w`` with a gradient ``g`` (both flattened to vectors; a complex tensor
    as its real view), before every step of the base optimizer::

        g_perp = g - (w . g) / (w . w) * w          # component of g orthogonal to w
        g_new  = g_perp * ||g||_2 / ||g_perp||_2    # rescaled to the norm of the original g

    and ``g_new`` is written back into ``p.grad`` (in the gradient's dtype). Then
    ``base_optimizer.step()`` runs on the projected gradients. With plain SGD (no momentum, no
    weight decay) the update is exactly orthogonal to ``w``, so it cannot scale ``w`` up; other
    optimizers apply their own rule (momentum, preconditioning, decay) to the projected gradient.

    Numerics: the element-wise arithmetic runs in fp32 (fp64 for fp64 parameters) on ``w`` and
    ``g`` divided by their largest magnitudes (so no square under- or overflows, whatever the
    scale of ``w`` or ``g``), the reductions ``w . w``, ``w . g``, ``||g||``, ``||g_perp||``
    accumulate in fp64, and no host sync is made.
    Degenerate cases are defined rather than left to an epsilon:

    * ``w = 0`` (``w . w == 0``): no direction to remove; the gradient is left unchanged.
      (The authors' implementation adds ``1e-30`` to the denominators instead.)
    * ``g`` parallel to ``w`` -- ``||g_perp|| <= 16 * eps * ||g||`` with ``eps`` the machine
      epsilon of the compute dtype, i.e. only rounding noise remains -- or ``g = 0``: the new
      gradient is 0 (an update of 0 with SGD), never noise inflated to ``||g||`` and never NaN.

    The wrapper owns no optimisation state of its own. ``param_groups``, ``state`` and
    ``defaults`` *are* the base optimizer's objects (shared, not copied), so an LR scheduler
    built on the ``OrthoGrad`` changes the learning rate the base optimizer steps with,
    per-group options work exactly as in the base optimizer, and :meth:`state_dict` /
    :meth:`load_state_dict` produce and accept the base optimizer's format (a checkpoint of a
    plain ``AdamW`` loads into ``OrthoGrad(..., torch.optim.AdamW)`` and back).

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs, or of param-group dicts with
            per-group options, as for any ``torch.optim`` optimizer.
        base_optimizer_cls: a ``torch.optim.Optimizer`` subclass (default ``torch.optim.SGD``).
        **base_kwargs: every keyword is passed to ``base_optimizer_cls`` unchanged (``lr``,
            ``betas``, ``eps``, ``weight_decay``, ``momentum``, ``foreach``, ...); a keyword the
            base optimizer does not accept raises its ``TypeError``, nothing is dropped.

    Example::

        opt = OrthoGrad(model.parameters(), torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        loss.backward(); opt.step(); sched.step(); opt.zero_grad()

    With a ``closure`` the gradients the closure computes are projected before the base
    optimizer uses them (also for optimizers that evaluate the closure several times per step,
    such as ``LBFGS``). Sparse gradients are not supported.
    """

    #: Relative size (in machine epsilons of the compute dtype) below which ``||g_perp||`` is
    #: rounding noise and the projected gradient is set to 0.
    PARALLEL_TOL_EPS = 16.0

    def __init__(self, params, base_optimizer_cls: type = torch.optim.SGD, **base_kwargs: Any) -> None:
        if isinstance(base_optimizer_cls, torch.optim.Optimizer):
            raise TypeError("base_optimizer_cls must be an optimizer class, not an instance "
                            f"({type(base_optimizer_cls).__name__}); pass e.g. torch.optim.AdamW")
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError("base_optimizer_cls must be a subclass of torch.optim.Optimizer, got "
                            f"{base_optimizer_cls!r}")
        base = base_optimizer_cls(params, **base_kwargs)
        # Optimizer.__init__ sets up the hook dicts and the profiled step; it re-adds the base's
        # (already validated) groups through Optimizer.add_param_group, then we share the base's
        # containers so that there is a single source of truth.
        super().__init__(base.param_groups, base.defaults)
        self.base_optimizer = base
        self._share()

    def _share(self) -> None:
        base = self.base_optimizer
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = base.defaults

    # ------------------------------------------------------------------------- projection

    @staticmethod
    @torch.no_grad()
    def orthogonalize_(param: Tensor) -> None:
        """Replace ``param.grad`` by its ⊥Grad projection (see the class docstring), in place."""
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("OrthoGrad does not support sparse gradients")
        w, g = param.detach(), grad
        if w.is_complex():
            w, g = torch.view_as_real(w), torch.view_as_real(g)
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        f64 = torch.float64
        wf = w.reshape(-1).to(compute)
        gf = g.reshape(-1).to(compute)
        # The reductions see w / max|w| and g / max|g| (entries in [-1, 1]), so no square under- or
        # overflows whatever the scale of w or g (fp32 gradients of 1e-30 or 1e30 included).
        w_max, g_max = wf.abs().max(), gf.abs().max()
        w_div = torch.where(w_max > 0, w_max, 1.0)
        g_div = torch.where(g_max > 0, g_max, 1.0)
        wn, gn = wf / w_div, gf / g_div
        ww = torch.sum(wn * wn, dtype=f64)
        wg = torch.sum(wn * gn, dtype=f64)
        gg = torch.sum(gn * gn, dtype=f64)
        # (w . g) / (w . w) in the original units; 0 when w = 0 (nothing to remove)
        coef = torch.where(ww > 0, wg / torch.where(ww > 0, ww, 1.0), 0.0) * (g_div.to(f64) / w_div.to(f64))
        g_perp = gf - coef.to(compute) * wf  # exactly g when w . g == 0
        gp = g_perp / g_div
        pp = torch.sum(gp * gp, dtype=f64)
        tol = OrthoGrad.PARALLEL_TOL_EPS * torch.finfo(compute).eps
        keep = pp > (tol * tol) * gg  # otherwise g_perp is rounding noise (g parallel to w) or g = 0
        scale = torch.where(keep, (gg / torch.where(keep, pp, 1.0)).sqrt(), 0.0)  # ||g|| / ||g_perp||
        g.copy_((g_perp * scale.to(compute)).view(g.shape))

    @torch.no_grad()
    def orthogonalize_grads_(self) -> None:
        """Project the gradients of every parameter of every group (what :meth:`step` does first)."""
        for group in self.param_groups:
            for p in group["params"]:
                self.orthogonalize_(p)

    # ------------------------------------------------------------------------- optimizer API

    def step(self, closure: Optional[Callable[[], Any]] = None):
        """Project the gradients, then take one step of the base optimizer.

        ``closure`` (re-evaluates the model and returns the loss) is wrapped so that the
        gradients it produces are projected before the base optimizer reads them.
        """
        if closure is None:
            self.orthogonalize_grads_()
            return self.base_optimizer.step()

        def projected_closure():
            loss = closure()
            self.orthogonalize_grads_()
            return loss

        return self.base_optimizer.step(projected_closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer (and so to this wrapper: the list is shared)."""
        if "base_optimizer" not in self.__dict__:  # during Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._share()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (same format; this wrapper adds no state).

        Hooks registered on this wrapper with ``register_state_dict_pre_hook`` /
        ``register_state_dict_post_hook`` run around the base optimizer's own.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.base_optimizer.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this wrapper or of a plain base optimizer into the base optimizer.

        The base optimizer's ``load_state_dict`` (and its ``__setstate__`` upgrades) does the
        work; this wrapper's load-state-dict pre/post hooks run around it, and the shared
        ``param_groups`` / ``state`` are re-bound to the base optimizer's new objects.
        """
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.base_optimizer.load_state_dict(state_dict)
        self._share()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "base_optimizer" in self.__dict__:
            self._share()

    def __repr__(self) -> str:
        inner = repr(self.base_optimizer).replace("\n", "\n    ")
        return f"{type(self).__name__}(\n    {inner}\n)"
