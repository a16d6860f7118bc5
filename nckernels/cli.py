"""Command line: ``python -m nckernels [collapse|demo] [options]`` (also the ``nckernels`` script).

``collapse`` (the default) measures the token-level neural collapse of a causal LM on a corpus
(``nckernels.collapse.pipeline``; with no arguments: the embedded SmolLM2-135M-Instruct on the
embedded public-domain text) and writes metrics.json, classes.csv and plots.

``demo`` trains a tiny causal LM on CPU twice from the same seed, once with
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
from pathlib import Path


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


def _collapse(args) -> int:
    import torch

    from .collapse import pipeline, report

    if args.compare:
        print(report.compare(args.compare))
        return 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    device = args.device
    if world > 1:  # torchrun
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    model, tokenizer, provenance = pipeline.load_model(args.model, dtype, device)
    docs, corpus = pipeline.load_corpus(args.text, args.dataset, args.text_field)
    if args.max_tokens is None and not args.text and not args.dataset:
        args.max_tokens = pipeline.EMBEDDED_TOKEN_BUDGET  # a few minutes on 2 CPU cores; --max-tokens N for more
    blocks = pipeline.pack(docs, tokenizer, args.seq_len, args.heldout_fraction, args.max_tokens)
    settings = pipeline.Settings(seq_len=args.seq_len, batch_size=args.batch_size,
                                 heldout_fraction=args.heldout_fraction, max_tokens=args.max_tokens,
                                 exact_within_cov=args.exact_within_cov, world_size=world, min_count=args.min_count)
    fingerprint = {"model": provenance["model_fingerprint"], "tokenizer": provenance["tokenizer_fingerprint"],
                   "corpus": blocks.fingerprint()}
    total = sum(int((b[:, 1:] != -100).sum()) for part in (blocks.train, blocks.heldout)
                for _, b in pipeline._batches(part, args.batch_size, rank, world))
    bar = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="tok", unit_scale=True, desc="collapse", dynamic_ncols=True)

    def tick(n, seconds):
        if bar is not None:
            bar.update(n)
            bar.set_postfix_str(f"{bar.n / max(seconds, 1e-9):,.0f} tok/s (model+stats)")

    stats, nc4, state = pipeline.measure(
        model, blocks, settings=settings, device=device, checkpoint=out / f"checkpoint-rank{rank}.pt",
        save_every=args.save_every, resume=args.resume, fingerprint=fingerprint, rank=rank, progress=tick,
        impl=args.impl)
    if bar is not None:
        bar.close()
    if rank != 0:
        return 0
    W = model.get_output_embeddings().weight.detach().to(stats.device, torch.float64)
    metrics = pipeline.report(stats, nc4, W, bands=args.bands, min_count=args.min_count, impl=args.impl)
    rows = pipeline.class_table(stats, nc4, W, tokenizer)
    provenance.update(corpus, train_tokens=stats.total, heldout_tokens=nc4.tokens, seq_len=args.seq_len,
                      heldout_fraction=args.heldout_fraction, classes_seen=int((stats.counts > 0).sum()),
                      num_classes=stats.num_classes, dim=stats.dim, world_size=world,
                      exact_within_cov=args.exact_within_cov, seconds_total=round(time.time() - t0, 1),
                      seconds_measuring=round(state.seconds, 1), nckernels=__import__("nckernels").__version__,
                      torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    report.write_metrics(out / "metrics.json", metrics, provenance)
    report.write_classes(out / "classes.csv", rows)
    plots = report.write_plots(out, metrics, rows)
    print(report.summary(metrics, provenance))
    print(f"report: {out / 'metrics.json'}, {out / 'classes.csv'}, " + ", ".join(str(p) for p in plots))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


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

    from .collapse import pipeline

    col = sub.add_parser("collapse", help="token-level neural collapse of a causal LM (default)")
    col.add_argument("--model", help="local HF model directory, .gguf file or cached model id "
                                     "(default: the embedded SmolLM2-135M-Instruct)")
    col.add_argument("--text", nargs="+", metavar="FILE", help="plain-text corpus files")
    col.add_argument("--dataset", help="JSONL file or local Hugging Face datasets directory")
    col.add_argument("--text-field", default="text", help="field of --dataset records holding the text")
    col.add_argument("--seq-len", type=_positive_int, default=256)
    col.add_argument("--batch-size", type=_positive_int, default=8, help="blocks of --seq-len tokens per forward")
    col.add_argument("--heldout-fraction", type=_fraction, default=0.1, help="fraction of blocks held out for NC4")
    col.add_argument("--max-tokens", type=_positive_int,
                     help="use only the first N tokens of the corpus (default: all; with the embedded corpus "
                          f"{pipeline.EMBEDDED_TOKEN_BUDGET}, of about 45,000)")
    col.add_argument("--device", default="cpu")
    col.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    col.add_argument("--exact-within-cov", action="store_true",
                     help="also accumulate the D x D within-class scatter (Papyan's NC1; exact in one pass)")
    col.add_argument("--bands", type=_positive_int, nargs="+", default=list(pipeline.DEFAULT_BANDS),
                     help="token-count band edges for the per-band metrics")
    col.add_argument("--min-count", type=_positive_int, default=1,
                     help="classes with fewer training tokens are excluded from every metric (NC4 candidates too)")
    col.add_argument("--out", default="collapse-report", help="output directory")
    col.add_argument("--save-every", type=int, default=25, help="checkpoint every N batches (0: never)")
    col.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    col.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print runs side by side and exit")
    col.add_argument("--impl", default="auto", choices=["auto", "triton", "cpp", "reference"])
    col.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    col.add_argument("--quiet", action="store_true", help="no progress bar")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["collapse"] + argv  # the main job runs on its embedded default with no arguments
    args = parser.parse_args(argv)
    return _collapse(args) if args.command == "collapse" else _demo(args)


if __name__ == "__main__":
    sys.exit(main())
