"""Hugging Face ``transformers`` integration: causal-LM training loss without logits.

``patch(model)`` makes a Hugging Face causal language model (``LlamaForCausalLM``,
``GPT2LMHeadModel``, ``Gemma2ForCausalLM``, ... any model whose forward projects the final
hidden states through ``model.get_output_embeddings()`` and then calls ``self.loss_function``)
compute its training loss with :func:`nckernels.linear_cross_entropy` straight from the final
hidden states and the output-embedding weight, so the ``(batch, seq, vocab)`` logits are never
materialised, in the forward or in the backward::

    from nckernels.integrations.transformers import patch, unpatch

    model = AutoModelForCausalLM.from_pretrained(...)
    patch(model)                        # or patch(model, impl="triton", z_loss=1e-4)
    out = model(input_ids, labels=labels)
    out.loss.backward()                 # out.logits is None
    unpatch(model)                      # back to the stock forward

What changes, and what does not
-------------------------------
* **Calls with ``labels``** return the model's usual output object with ``loss`` set and
  ``logits=None`` (with ``return_dict=False``: the tuple without the logits). The loss equals
  Hugging Face's ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``): labels shifted by
  one (or a ``shift_labels`` keyword used as given), ``ignore_index`` (default -100, also taken
  from the ``ignore_index`` keyword), fp32 math, and the mean over non-ignored tokens or, with
  ``num_items_in_batch``, the sum divided by it (gradient accumulation). Anything the model adds
  to the loss after ``loss_function`` (e.g. the MoE router auxiliary loss of Mixtral/Qwen-MoE
  with ``output_router_logits=True``) is still added, because the model's own forward runs.
* **Calls without ``labels``** (inference, ``generate()``, ``logits_to_keep``) run the original
  forward untouched and return the same logits as the unpatched model.
* Tied input/output embeddings need nothing special: the shared weight gets both gradients.
* ``z_loss``, ``label_smoothing`` and ``grad_filter`` are opt-in extras passed to
  :func:`nckernels.linear_cross_entropy`; with their defaults the loss is HF's.

How it works
------------
While a labelled call runs, two things are swapped for the duration of the call only
(``try``/``finally``, restored even on error):

1. the output embedding's ``forward`` is replaced by a recorder that keeps its input (the final
   hidden states, after any ``logits_to_keep`` slicing) and returns a tiny fp32 *probe* tensor
   of shape ``(..., 8)`` holding known values instead of the ``(..., vocab)`` logits;
2. ``model.loss_function`` (HF's ``ForCausalLMLoss``) is replaced by a function that receives
   what the model's forward passes to it -- the probe after any post-projection logit transform,
   the labels, ``vocab_size``, ``num_items_in_batch``, ``shift_labels``, ``ignore_index`` -- and
   returns ``linear_cross_entropy(hidden, W, labels, linear_bias=b, shift=True, ...)``.

The model's own forward then runs *with* its labels, so every family-specific step before and
after the loss happens as usual. The probe tells us what the model does to its logits between
the projection and the loss; on the first labelled call it is read once (one host sync) and
must match one of:

* nothing (Llama, Mistral, Qwen, GPT-2, Phi, ...);
* soft-capping ``c * tanh(z / c)`` (Gemma-2/3 ``config.final_logit_softcapping``,
  RecurrentGemma, ...): passed as ``softcap=c`` (snapped to the config value);
* a constant scale ``s * z`` (Cohere ``logit_scale``, Granite ``1 / logits_scaling``): folded
  into the hidden states and bias, ``(s h) W^T + s b``.

Anything else (a shape change, an offset, a mask) raises ``NotImplementedError`` rather than
giving a silently wrong loss. The result is kept for the life of the patch: call ``patch`` again
after changing, say, ``config.final_logit_softcapping``.

Limitations
-----------
* The output embedding must be a plain ``nn.Linear`` (its ``forward`` not overridden): quantised
  heads (bitsandbytes), LoRA-wrapped heads and FSDP-sharded heads are rejected or unsupported.
* Models that compute their LM loss without ``self.loss_function`` (the ``*ForCausalLM``
  decoders of encoder-decoder families such as ``BartForCausalLM``, which do *not* shift the
  labels; ``ProphetNet``, ``CpmAnt``, ``Clvp``), models whose ``loss_function`` is not HF's
  ``ForCausalLMLoss`` (a custom one set by the user), and models that slice the vocabulary of
  their logits (``vocab_size`` passed to the loss differs from the weight's rows) are refused
  with a clear error.
* PEFT: patch the underlying model (``patch(peft_model.get_base_model())``); its forward is
  what PEFT calls.
* With labels, ``logits`` is ``None``: evaluation loops that need logits for metrics should use
  ``patch(..., training_only=True)`` (the fused path then runs only while ``model.training``).
* If the weight and hidden states have different dtypes (autocast), both are cast to the autocast
  dtype (what ``nn.Linear`` does under autocast); without autocast the hidden states are cast to
  the weight dtype. A scale (Cohere, Granite) is applied to the hidden states in their dtype.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ["patch", "unpatch", "is_patched"]

_STATE_ATTR = "_nckernels_patch"


class _Missing:
    """"No instance attribute" marker; stays the same object through copy.deepcopy and pickle."""

    def __repr__(self):
        return "<missing>"

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
# Probe "logits" returned in place of the real ones: powers of two, so that a constant scale is
# recovered exactly in fp32; 1024 saturates any practical soft-cap.
_PROBE = (-64.0, -8.0, -1.0, 0.5, 2.0, 16.0, 64.0, 1024.0)
_SOFTCAP_CONFIG_ATTRS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap",
                         "logit_softcapping", "final_logit_softcap")


# ----------------------------------------------------------------------------- public API


def patch(
    model: nn.Module,
    *,
    impl: str = "auto",
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    grad_filter: Optional[float] = None,
    training_only: bool = False,
) -> nn.Module:
    """Make ``model`` compute its causal-LM training loss with :func:`nckernels.linear_cross_entropy`.

    Args:
        model: a Hugging Face causal LM (``PreTrainedModel`` with ``get_output_embeddings()``
            returning an ``nn.Linear`` and a forward that calls ``self.loss_function``).
        impl: backend of :func:`nckernels.linear_cross_entropy` (``"auto"``, ``"triton"``,
            ``"cpp"``, ``"reference"``).
        z_loss: coefficient of the ``lse**2`` auxiliary loss (0 = HF's loss).
        label_smoothing: as in ``F.cross_entropy`` (0 = HF's loss).
        grad_filter: ``None`` (exact) or the gradient-filtering threshold (Triton only).
        training_only: use the fused loss only while ``model.training``; in eval mode labelled
            calls then go through the stock forward and return logits.

    Returns:
        ``model`` itself, patched in place (patching again replaces the options).

    Raises:
        TypeError / ValueError when the model cannot be patched faithfully (see the module
        docstring), before anything is changed.
    """
    from .. import backend as _backend
    from ..functional import _check_scalar

    if impl not in _backend.IMPLS:
        raise ValueError(f"impl must be one of {_backend.IMPLS}, got {impl!r}")
    _check_scalar("z_loss", z_loss, low=0.0)
    _check_scalar("label_smoothing", label_smoothing, low=0.0, high=1.0)
    if grad_filter is not None:
        _check_scalar("grad_filter", grad_filter, low=0.0, strict_low=True)
    _check_model(model)

    if is_patched(model):
        unpatch(model)
    state = _PatchState(
        options=dict(impl=impl, z_loss=float(z_loss), label_smoothing=float(label_smoothing),
                     grad_filter=grad_filter),
        training_only=bool(training_only),
        instance_forward=model.__dict__.get("forward", _MISSING),
    )
    model.__dict__[_STATE_ATTR] = state
    model.forward = _PatchedForward(model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: restore the model's original ``forward``. A no-op if not patched."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    if state.instance_forward is _MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = state.instance_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    return _STATE_ATTR in model.__dict__


# ----------------------------------------------------------------------------- checks


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"model must be a Hugging Face PreTrainedModel, got {type(model).__name__}")
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__}.get_output_embeddings() is None: not a language model with an LM head")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"the output embedding of {type(model).__name__} is a {type(head).__module__}.{type(head).__name__}; "
            "nckernels can only fuse a plain nn.Linear head (not quantised, LoRA-wrapped or custom)"
        )
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError as exc:  # pragma: no cover - transformers too old
        raise ImportError("nckernels.integrations.transformers needs transformers with transformers.loss") from exc
    loss_fn = getattr(model, "loss_function", None)
    if loss_fn is not ForCausalLMLoss:
        raise ValueError(
            f"{type(model).__name__}.loss_function is {getattr(loss_fn, '__name__', loss_fn)!r}, not HF's "
            "ForCausalLMLoss (loss_type / a custom loss_function); nckernels would not compute the same loss"
        )
    # Static check that the forward goes through self.loss_function (a subclass may override forward and call
    # super().forward, so any forward along the MRO counts); calls are also counted at run time.
    sources = []
    for klass in type(model).__mro__:
        if "forward" in vars(klass):
            try:
                sources.append(inspect.getsource(vars(klass)["forward"]))
            except (OSError, TypeError):
                sources.append(None)
    if sources and None not in sources and not any("loss_function" in s for s in sources):
        raise ValueError(
            f"{type(model).__name__}.forward computes its loss without self.loss_function (e.g. without the causal "
            "label shift, like BartForCausalLM); nckernels cannot reproduce it -- not patched"
            + (" (for a PEFT model, patch model.get_base_model())" if hasattr(model, "get_base_model") else "")
        )


# ----------------------------------------------------------------------------- the patched forward


class _PatchState:
    def __init__(self, options: dict, training_only: bool, instance_forward: Any):
        self.options = options
        self.training_only = training_only
        self.instance_forward = instance_forward  # an instance-level forward (accelerate hooks) to call and restore
        self.transform: Optional[tuple[str, float]] = None  # ("identity"|"scale"|"softcap", value), once probed


class _Call:
    """What one labelled call records: the head input, and whether the loss ran."""

    def __init__(self):
        self.hidden: Optional[Tensor] = None
        self.head_calls = 0
        self.loss_calls = 0


class _PatchedForward:
    """The instance-level ``forward`` installed by :func:`patch` (keeps the original signature)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.__signature__ = inspect.signature(_original_forward(model))
        self.__doc__ = type(model).forward.__doc__

    def __call__(self, *args, **kwargs):
        model = self.model
        state: _PatchState = model.__dict__[_STATE_ATTR]
        forward = _original_forward(model)
        labels = kwargs.get("labels")
        if labels is None and "labels" not in kwargs and args:
            try:
                labels = self.__signature__.bind(*args, **kwargs).arguments.get("labels")
            except TypeError:
                labels = None  # the original forward raises the proper error
        if labels is None or (state.training_only and not model.training):
            return forward(*args, **kwargs)
        return _fused_forward(model, state, forward, args, kwargs)


def _original_forward(model: nn.Module):
    state = model.__dict__.get(_STATE_ATTR)
    if state is not None and state.instance_forward is not _MISSING:
        return state.instance_forward
    return type(model).forward.__get__(model)


def _fused_forward(model, state: _PatchState, forward, args, kwargs):
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(f"the output embedding changed to {type(head).__name__} after patch(); call patch() again")
    call = _Call()

    def record(hidden: Tensor) -> Tensor:
        call.head_calls += 1
        if call.head_calls > 1:
            raise NotImplementedError(
                f"{type(model).__name__} calls its output embedding more than once per forward; "
                "nckernels.integrations.transformers cannot fuse it"
            )
        call.hidden = hidden
        probe = torch.tensor(_PROBE, dtype=torch.float32, device=hidden.device)
        return probe.repeat(*hidden.shape[:-1], 1)

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **_unused):
        call.loss_calls += 1
        if call.hidden is None:
            raise RuntimeError(f"{type(model).__name__} called loss_function before its output embedding")
        return _loss(model, state, head, call.hidden, logits, labels, vocab_size, num_items_in_batch,
                     ignore_index, shift_labels)

    want_tuple = kwargs.pop("return_dict", None)
    if want_tuple is None:
        want_tuple = not getattr(model.config, "return_dict", True)
    else:
        want_tuple = not want_tuple
    prev_head_forward = head.__dict__.get("forward", _MISSING)
    prev_loss_fn = model.__dict__.get("_loss_function", _MISSING)
    head.forward = record
    model._loss_function = loss_function
    try:
        out = forward(*args, return_dict=True, **kwargs)
    finally:
        _restore(head, "forward", prev_head_forward)
        _restore(model, "_loss_function", prev_loss_fn)
    if call.loss_calls != 1:
        raise RuntimeError(
            f"{type(model).__name__}.forward called loss_function {call.loss_calls} times with labels (expected once); "
            "nckernels cannot tell which loss it computes"
        )
    out = _without_logits(out)
    return out.to_tuple() if want_tuple else out


def _restore(obj, name: str, prev) -> None:
    if prev is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        obj.__dict__[name] = prev


def _without_logits(out):
    import dataclasses

    if isinstance(out, tuple) or not dataclasses.is_dataclass(out):
        raise TypeError(f"expected a ModelOutput from the forward with return_dict=True, got {type(out).__name__}")
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    fields["logits"] = None
    return type(out)(**fields)


# ----------------------------------------------------------------------------- the loss


def _loss(model, state: _PatchState, head: nn.Linear, hidden: Tensor, probe_out, labels, vocab_size,
          num_items_in_batch, ignore_index, shift_labels) -> Tensor:
    from ..functional import linear_cross_entropy

    weight, bias = head.weight, head.bias
    if int(vocab_size) != weight.shape[0]:
        raise NotImplementedError(
            f"{type(model).__name__} computes its loss over vocab_size={vocab_size} logits but its output embedding "
            f"has {weight.shape[0]} rows (sliced or padded vocabulary); not supported"
        )
    if state.transform is None:
        transform = _infer_transform(model, probe_out, hidden.shape[:-1])
        if transform is None:  # no tokens to read the probe from: nothing to learn yet
            transform = ("identity", 1.0)
        else:
            state.transform = transform
    else:
        transform = state.transform

    hidden = hidden.to(weight.device)
    if torch.is_autocast_enabled(hidden.device.type):
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    kind, value = transform
    softcap = None
    if kind == "scale":
        hidden = hidden * value
        bias = bias * value if bias is not None else None
    elif kind == "softcap":
        softcap = value

    if shift_labels is not None:
        target, shift = shift_labels, False
    else:
        target, shift = labels, True
    target = target.to(hidden.device)
    if target.shape != hidden.shape[:-1]:
        if target.numel() * hidden.shape[-1] != hidden.numel() or shift:
            raise ValueError(
                f"{'shift_labels' if not shift else 'labels'} of shape {tuple(target.shape)} do not match the "
                f"hidden states fed to the output embedding, {tuple(hidden.shape)} (is logits_to_keep set with labels?)"
            )
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(
        hidden, weight, target, linear_bias=bias, reduction=reduction, ignore_index=int(ignore_index),
        softcap=softcap, shift=shift, **state.options,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _infer_transform(model, probe_out, lead_shape) -> Optional[tuple[str, float]]:
    """Read the probe after the model's post-projection code: identity, a scale or a soft-cap."""
    name = type(model).__name__
    expected = tuple(lead_shape) + (len(_PROBE),)
    if not torch.is_tensor(probe_out) or tuple(probe_out.shape) != expected:
        shape = tuple(probe_out.shape) if torch.is_tensor(probe_out) else type(probe_out).__name__
        raise NotImplementedError(
            f"{name} reshapes or slices its logits between the output embedding and the loss "
            f"(expected {expected}, got {shape}); nckernels cannot fuse it"
        )
    if probe_out.numel() == 0:
        return None
    p = _PROBE
    o = [float(v) for v in probe_out.detach().reshape(-1, len(p))[0].double().cpu()]
    eps = torch.finfo(probe_out.dtype).eps if probe_out.is_floating_point() else 1.0
    tol = 8 * eps

    def close(a, b):
        return all(math.isfinite(x) and abs(x - y) <= tol * max(abs(y), 1.0) for x, y in zip(a, b))

    # a constant scale (1 = identity)
    s = o[-1] / p[-1]
    if s != 0 and math.isfinite(s) and close(o, [s * v for v in p]):
        return ("identity", 1.0) if abs(s - 1.0) <= tol else ("scale", s)
    # a soft-cap c * tanh(z / c): solve for c on the largest probe value, then check every value
    big, o_big = p[-1], o[-1]
    if math.isfinite(o_big) and 0 < o_big < big:
        lo, hi = math.log(o_big), math.log(1e12)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            c = math.exp(mid)
            if c * math.tanh(big / c) < o_big:
                lo = mid
            else:
                hi = mid
        c = math.exp(0.5 * (lo + hi))
        for cfg in (model.config, _text_config(model.config)):
            for attr in _SOFTCAP_CONFIG_ATTRS:
                v = getattr(cfg, attr, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and abs(v - c) <= 1e-4 * c:
                    c = float(v)
        if close(o, [c * math.tanh(v / c) for v in p]):
            return ("softcap", c)
    raise NotImplementedError(
        f"{name} transforms its logits between the output embedding and the loss in a way nckernels cannot express "
        f"(not a scale or a soft-cap: probe {list(p)} became {o}); not supported"
    )


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except Exception:  # pragma: no cover - exotic configs
        return config
