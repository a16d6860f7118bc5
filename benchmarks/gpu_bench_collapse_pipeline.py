"""GPU benchmark of the `nckernels collapse` collection step at the SmolLM2-135M shape.

    python benchmarks/gpu_bench_collapse_pipeline.py --out DIR [--batch 16 --seq 1024]

The model is a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's configuration
(30 layers, width 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings) in bf16: its
timings equal the real model's, and the device machine needs no model files. Tokens are drawn
from a Zipf(1.1) law over the vocabulary, like text. Times (CUDA events, ``do_bench`` median):

* ``forward``: the model's own forward with logits (what evaluating it costs);
* ``hooked_forward``: the collection forward (stopped by the pre-hook before the LM head);
* ``class_stats``: ``ClassStats.update`` of one batch (features bf16, fp64 state on the GPU);
* ``nc4``: ``NC4Agreement.update`` of one batch (two running argmaxes, fp32 products);

and reports the collection overhead ``class_stats / forward`` (target <= 10%) and the pipeline's
tokens/s ``tokens / (hooked_forward + class_stats)``. Writes ``pipeline.json`` / ``pipeline.md``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    args = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from triton.testing import do_bench

    from nckernels.collapse import ClassStats, NC4Agreement
    from nckernels.collapse.pipeline import FeatureHook

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    weights = 1.0 / torch.arange(1, config.vocab_size + 1, dtype=torch.float64) ** 1.1
    perm = torch.randperm(config.vocab_size)
    tokens = perm[torch.multinomial(weights, args.batch * (args.seq + 1), replacement=True)]
    tokens = tokens.view(args.batch, args.seq + 1).cuda()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(inputs)
    hook = FeatureHook(model)
    W = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        h = hook(model, inputs, mask)
        hook.remove()
        t_forward = do_bench(lambda: model(input_ids=inputs, attention_mask=mask, use_cache=False))
        hook = FeatureHook(model)
        t_hooked = do_bench(lambda: hook(model, inputs, mask))
    stats = ClassStats(config.vocab_size, config.hidden_size, device="cuda")
    stats.update(h, labels)
    t_stats = do_bench(lambda: stats.update(h, labels))
    nc4 = NC4Agreement(stats, W)
    t_nc4 = do_bench(lambda: nc4.update(h, labels), rep=200)
    n = args.batch * args.seq
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
           "forward_ms": t_forward, "hooked_forward_ms": t_hooked, "class_stats_ms": t_stats, "nc4_ms": t_nc4,
           "overhead": t_stats / t_forward, "pipeline_tok_per_s": n / ((t_hooked + t_stats) / 1e3),
           "forward_tok_per_s": n / (t_forward / 1e3)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(row, indent=2))
    md = ["| shape | forward ms | hooked forward ms | class_stats ms | overhead (target <= 10%) | nc4 ms | "
          "pipeline tok/s | model tok/s |", "|---|---|---|---|---|---|---|---|",
          f"| {args.batch} x {args.seq}, bf16 | {t_forward:.2f} | {t_hooked:.2f} | {t_stats:.2f} | "
          f"{100 * row['overhead']:.1f}% | {t_nc4:.2f} | {row['pipeline_tok_per_s']:,.0f} | "
          f"{row['forward_tok_per_s']:,.0f} |"]
    (out / "pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
