"""Command line: ``python -m nckernels [demo] [options]`` (also the ``nckernels`` script).

``demo`` (the default) trains a tiny causal LM on CPU twice from the same seed, once with
Hugging Face's own loss (full logits) and once patched to ``nckernels.linear_cross_entropy``
(no logits), each in its own process so that peak memory is that process's own, and prints
the two loss curves side by side, their agreement, the time per step and the peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _bigram_batches(vocab: int, batch: int, seq: int, steps: int, seed: int):
    """Token batches from a fixed random sparse bigram model: learnable, so the loss falls."""
    import torch

    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    for _ in range(steps):
        tokens = torch.empty(batch, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            choice = torch.randint(0, 4, (batch,), generator=g)
            tokens[:, t] = successors[tokens[:, t - 1], choice]
        yield tokens


def _train(args) -> dict:
    """One training run in this process; returns losses, timing and peak RSS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    if args.variant == "nckernels":
        from .integrations.transformers import patch

        patch(model, impl=args.impl)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    losses, times = [], []
    for tokens in _bigram_batches(args.vocab, args.batch, args.seq, args.steps, args.seed):
        labels = tokens.clone()
        labels[:, : args.seq // 8] = -100  # a masked prompt, as in instruction tuning
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"losses": losses, "step_s": sorted(times)[len(times) // 2],
            "peak_rss_mb": peak_rss / 1024, "train_rss_growth_mb": (peak_rss - base_rss) / 1024}


def _demo(args) -> int:
    if args.variant:
        print(json.dumps(_train(args)))
        return 0
    runs = {}
    for variant in ("torch", "nckernels"):
        cmd = [sys.executable, "-m", "nckernels", "demo", "--variant", variant] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("variant", "command")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            return out.returncode
        runs[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = runs["torch"]["losses"], runs["nckernels"]["losses"]
    tokens = args.batch * (args.seq - 1 - args.seq // 8)
    print(f"Tiny Llama (vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, tied embeddings), "
          f"{args.steps} AdamW steps of {args.batch}x{args.seq} tokens ({tokens} scored) on CPU; "
          f"logits per step: {args.batch * args.seq * args.vocab * 4 / 2**20:.0f} MiB in fp32.")
    print(f"{'step':>4}  {'HF loss (logits)':>16}  {'nckernels loss':>14}  {'rel diff':>9}")
    for i, (x, y) in enumerate(zip(a, b)):
        if i < 5 or i == len(a) - 1 or i % max(1, len(a) // 5) == 0:
            print(f"{i:>4}  {x:>16.6f}  {y:>14.6f}  {abs(x - y) / abs(x):>9.2e}")
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"max relative loss difference over {len(a)} steps: {worst:.2e}")
    for name in ("torch", "nckernels"):
        r = runs[name]
        print(f"{name:>9}: median step {r['step_s'] * 1e3:7.1f} ms, peak RSS {r['peak_rss_mb']:7.0f} MiB "
              f"(+{r['train_rss_growth_mb']:.0f} MiB during training)")
    # Training runs on the same data from the same initial weights; fp32 reorderings compound over steps.
    return 0 if worst < args.tolerance else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nckernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="train a tiny causal LM with our loss beside PyTorch's (default)")
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq", type=int, default=128)
    demo.add_argument("--vocab", type=int, default=32768)
    demo.add_argument("--hidden", type=int, default=128)
    demo.add_argument("--layers", type=int, default=2)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--impl", default="auto", choices=["auto", "cpp", "reference", "triton"])
    demo.add_argument("--tolerance", type=float, default=1e-3,
                      help="fail (exit 1) if the two loss curves differ by more than this, relatively")
    demo.add_argument("--variant", choices=["torch", "nckernels"], help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["demo"] + argv  # the main job runs on its embedded default with no arguments
    return _demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
