"""``nckernels.integrations.transformers``: patched HF causal LMs match the stock ones.

Tiny randomly initialised models (no download), fp32, eager attention, dropout off. For each
family the patched model's loss and the gradients of every parameter equal the unpatched
model's, with ignored (-100) labels, with and without ``num_items_in_batch``; calls without
labels return the same logits; ``unpatch`` restores the stock forward.

Families: Llama (untied), GPT-2 (tied), Gemma-2 (tied, ``final_logit_softcapping``), Phi
(output-embedding bias), Cohere (``logit_scale``) and Mixtral (router auxiliary loss added
after the LM loss).
"""
from __future__ import annotations

import copy
import inspect
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nckernels.integrations.transformers import is_patched, patch, unpatch  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, attn_implementation="eager")


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=97, **SMALL))


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def _gemma2(softcap=1.0):
    # A small cap, so that it really bites on the random-init logits (checked below).
    cfg = transformers.Gemma2Config(vocab_size=113, head_dim=8, final_logit_softcapping=softcap, initializer_range=0.5,
                                    **SMALL)
    return transformers.Gemma2ForCausalLM(cfg)


def _phi():
    cfg = transformers.PhiConfig(vocab_size=131, **{k: v for k, v in SMALL.items() if k != "num_key_value_heads"})
    return transformers.PhiForCausalLM(cfg)


def _cohere():
    cfg = transformers.CohereConfig(vocab_size=97, logit_scale=0.3, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                    **SMALL)
    return transformers.CohereForCausalLM(cfg)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=97, num_local_experts=4, num_experts_per_tok=2,
                                     output_router_logits=True, router_aux_loss_coef=0.5, **SMALL)
    return transformers.MixtralForCausalLM(cfg)


FAMILIES = {"llama": _llama, "gpt2": _gpt2, "gemma2": _gemma2, "phi": _phi, "cohere": _cohere, "mixtral": _mixtral}


def _make(family, seed=0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]().float()
    model.train()
    return model


def _batch(model, B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def _impls():
    out = [pytest.param("reference", id="reference")]
    from nckernels import _ext

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        have_cpp = _ext.get() is not None
    out.append(pytest.param("cpp", id="cpp", marks=() if have_cpp else pytest.mark.skip(
        reason="C++ extension nckernels._C unavailable")))
    return out


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_same_grads(ref, got):
    gr, gg = _grads(ref), _grads(got)
    assert gr.keys() == gg.keys()
    for name in gr:
        assert gg[name] is not None, name
        torch.testing.assert_close(gg[name], gr[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- loss and gradients


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_grads_match(family, impl):
    ref = _make(family)
    fused = patch(copy.deepcopy(ref), impl=impl)
    ids, labels = _batch(ref)
    for num_items in (None, torch.tensor(7)):
        kw = {} if num_items is None else {"num_items_in_batch": num_items}
        ref.zero_grad(set_to_none=True)
        fused.zero_grad(set_to_none=True)
        out_ref = ref(ids, labels=labels, **kw)
        out = fused(ids, labels=labels, **kw)
        assert out.logits is None and type(out) is type(out_ref)
        torch.testing.assert_close(out.loss, out_ref.loss, rtol=RTOL, atol=ATOL)
        out_ref.loss.backward()
        out.loss.backward()
        _assert_same_grads(ref, fused)
    if family == "mixtral":  # the router auxiliary loss is still part of the loss
        assert out.aux_loss is not None and out.aux_loss.item() > 0


def test_num_items_in_batch_is_sum_over_count():
    model = patch(_make("llama"), impl="reference")
    ids, labels = _batch(model)
    mean = model(ids, labels=labels).loss
    n_valid = int((labels[..., 1:] != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=n_valid).loss  # a plain int works too
    torch.testing.assert_close(summed, mean, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=2 * n_valid).loss, mean / 2)


def test_tied_embeddings_share_one_weight():
    model = patch(_make("gpt2"), impl="reference")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_gemma2_softcap_is_used():
    """The cap changes the loss, and the patched model follows it (config value passed as softcap)."""
    capped, uncapped = _make("gemma2"), _make("gemma2")
    uncapped.config.final_logit_softcapping = None
    patch(capped, impl="reference")
    ids, labels = _batch(capped)
    with torch.no_grad():
        a, b = capped(ids, labels=labels).loss, uncapped(ids, labels=labels).loss
    assert not torch.allclose(a, b, rtol=1e-3)
    assert capped.__dict__["_nckernels_patch"].transform == ("softcap", 1.0)


def test_shift_labels_kwarg():
    ref = _make("llama")
    fused = patch(copy.deepcopy(ref), impl="reference")
    ids, labels = _batch(ref)
    shift_labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    shift_labels[0, 4] = -100
    out_ref = ref(ids, labels=labels, shift_labels=shift_labels)
    out = fused(ids, labels=labels, shift_labels=shift_labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(out.loss, fused(ids, labels=labels).loss)


def test_positional_labels_and_return_dict_false():
    ref = _make("llama")
    fused = patch(copy.deepcopy(ref), impl="reference")
    ids, labels = _batch(ref)
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
    out = fused(ids, None, None, None, None, labels, use_cache=False)
    torch.testing.assert_close(out.loss, ref(ids, labels=labels, use_cache=False).loss, rtol=RTOL, atol=ATOL)
    tup_ref = ref(ids, labels=labels, use_cache=False, return_dict=False)
    tup = fused(ids, labels=labels, use_cache=False, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(tup_ref) - 1  # (loss,) without the logits
    torch.testing.assert_close(tup[0], tup_ref[0], rtol=RTOL, atol=ATOL)


def test_head_forward_hook_scale_followed_and_unknown_transform_refused():
    ref = _make("llama")
    fused = patch(copy.deepcopy(ref), impl="reference")
    ids, labels = _batch(ref)
    for m in (ref, fused):
        m.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out * 4.0)
    torch.testing.assert_close(fused(ids, labels=labels).loss, ref(ids, labels=labels).loss, rtol=RTOL, atol=ATOL)

    odd = patch(_make("llama"), impl="reference")
    odd.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out.abs())
    with pytest.raises(NotImplementedError, match="transforms its logits"):
        odd(ids, labels=labels)
    assert "forward" not in odd.get_output_embeddings().__dict__  # restored after the error
    assert "_loss_function" not in odd.__dict__


# ----------------------------------------------------------------------------- without labels, unpatch


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_no_labels_same_logits_and_unpatch(family):
    ref = _make(family)
    fused = patch(copy.deepcopy(ref), impl="reference")
    ids, labels = _batch(ref)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, ref(ids).logits, rtol=0, atol=0)
        last = fused(ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, ref.config.vocab_size)
        torch.testing.assert_close(last, ref(ids, logits_to_keep=1).logits, rtol=0, atol=0)
    assert inspect.signature(fused.forward) == inspect.signature(ref.forward)  # Trainer inspects it
    assert is_patched(fused)
    unpatch(fused)
    assert not is_patched(fused) and "forward" not in fused.__dict__
    out, out_ref = fused(ids, labels=labels), ref(ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=0, atol=0)
    unpatch(fused)  # a no-op


def test_generate_unchanged():
    ref = _make("llama").eval()
    fused = patch(copy.deepcopy(ref), impl="reference")
    ids, _ = _batch(ref)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(ids, **kw), ref.generate(ids, **kw))


def test_training_only_and_deepcopy():
    model = patch(_make("llama"), impl="reference", training_only=True)
    ids, labels = _batch(model)
    assert model(ids, labels=labels).logits is None
    model.eval()
    out = model(ids, labels=labels)
    assert out.logits is not None and out.loss is not None
    clone = copy.deepcopy(model.train())
    assert is_patched(clone) and clone.forward.model is clone
    torch.testing.assert_close(clone(ids, labels=labels).loss, model(ids, labels=labels).loss)


def test_repatch_replaces_options():
    model = patch(_make("llama"), impl="reference")
    ids, labels = _batch(model)
    base = model(ids, labels=labels).loss
    patch(model, impl="reference", z_loss=1e-2, label_smoothing=0.1)
    assert model(ids, labels=labels).loss > base
    unpatch(model)
    assert "forward" not in model.__dict__


# ----------------------------------------------------------------------------- refusals and packaging


def test_refuses_models_it_cannot_reproduce():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bart = transformers.BartForCausalLM(transformers.BartConfig(
            vocab_size=97, d_model=32, decoder_layers=1, encoder_layers=1, decoder_attention_heads=4,
            encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64))
    with pytest.raises(ValueError, match="without self.loss_function"):
        patch(bart)  # computes an unshifted loss itself
    model = _make("llama")
    model.loss_function = lambda *a, **k: None
    with pytest.raises(ValueError, match="ForCausalLMLoss"):
        patch(model)
    model = _make("llama")
    with pytest.raises(ValueError, match="z_loss"):
        patch(model, z_loss=-1.0)
    with pytest.raises(ValueError, match="impl"):
        patch(model, impl="fast")
    assert not is_patched(model)


def test_integrations_import_is_lazy(monkeypatch):
    """Both integration modules load with ``transformers`` unimportable (it is imported in patch() only)."""
    import importlib.util

    import nckernels.integrations as integrations

    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    folder = os.path.dirname(integrations.__file__)
    for name in ("__init__", "transformers"):
        spec = importlib.util.spec_from_file_location(f"_nckernels_lazy_{name}", os.path.join(folder, name + ".py"))
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert integrations.patch is patch and integrations.unpatch is unpatch
