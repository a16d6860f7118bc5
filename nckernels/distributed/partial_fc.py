"""Partial FC: a margin-loss classifier whose class centres are sharded over the ranks and sampled per step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import backend as _backend
from ..functional import _FLOAT_DTYPES, MarginSpec, _check_scalar, _check_tensor, margin_spec
from ..ops.margin import shard_backward, shard_forward
from .comm import all_gather_rows, all_gather_sizes, gather_rows, rank_and_size
from .sharded_lse import sharded_rows, tiled_size


@dataclass(frozen=True, eq=False)
class _MarginShard:
    """This rank's sampled centres; ``target`` indexes them, -1 where a row's class is on another rank."""
    target: Tensor
    margin: MarginSpec
    backend: str

    def shard_stats(self, embeddings, centres):
        m = self.margin
        lse_o, z_t = shard_forward(embeddings, centres, self.target, m.kind, m.s, m.m1, m.m2, m.m3, m.easy_margin,
                                   m.overflow, self.backend)
        return lse_o, (z_t,)

    def outputs(self, lse_o, summed):
        return (torch.nn.functional.softplus(lse_o - summed[0]),)

    def shard_backward(self, tensors, lse_o, summed, grads):
        (embeddings, centres), m = tensors, self.margin
        de, dw = shard_backward(embeddings, centres, self.target, lse_o, summed[0], grads[0], m.kind, m.s, m.m1, m.m2,
                                m.m3, m.easy_margin, m.overflow, m.gradient, self.backend)
        return de.to(embeddings.dtype), dw.to(centres.dtype)


class PartialFC(nn.Module):
    """Partial FC (An et al. 2022; insightface's ``partial_fc_v2``): a margin-loss classifier over very many
    classes, its centres sharded over the ranks of ``group`` and sampled at every step.

    Rank ``r`` of ``K`` holds the fp32 centres of the classes ``[r C // K, (r + 1) C // K)`` (``weight``;
    ``num_classes >= K``). ``forward(local_embeddings, local_labels)``:

    1. drops the rows labelled ``ignore_index`` and all-gathers the embeddings and labels of the others
       from every rank (local batch sizes may differ): the global batch of ``B`` active rows;
    2. samples on each rank the centres of every class of the global batch in its range (the positives,
       always kept) plus uniformly random others: ``max(#positives, ceil(sample_rate * C_r))`` centres
       (all of them, and no sampling, at ``sample_rate = 1``, which is then exactly the full loss);
    3. computes the margin loss of every row over the sampled centres of all ranks: each rank reduces its
       sample (``nckernels.ops.margin.shard_forward``: ``lse^o``, the log-sum-exp of the non-target
       logits, and the target logit ``z_t``), and the sharded log-sum-exp combines them,
       ``loss_i = softplus(logsumexp_r lse^o_(r)i - sum_r z_t(r)i)``;
    4. returns the mean over the ``B`` rows, identical on every rank; ``0.0`` (zero gradients, nothing
       sampled) when every row of every rank is ignored.

    Ignored rows are never positives, cost no communication or kernel work and get a zero gradient.

    Communication per step and rank: the all-gathers of the embeddings and labels (``O(B D)``), the
    all-reduces of two per-row scalars (``O(B)``) and, backward, one reduce-scatter (NCCL) or all-reduce
    (gloo, other backends) of the gathered embeddings' gradient (``O(B D)``, see
    ``comm.reduce_scatter_rows``); never anything of size ``C``.

    Gradients. ``weight`` gets the plain gradient of the returned loss (its shard is owned by this rank
    and must not be averaged: keep this module out of ``DistributedDataParallel``, which would also
    overwrite the shards with rank 0's at construction). The embeddings get the gradient of their rows
    summed over the ranks, times ``K`` when ``ddp=True``: a backbone wrapped in DDP (over the same
    ranks) averages its gradients over the ``K`` ranks, and the factor makes that average exactly the
    gradient of the returned loss (no double averaging). ``ddp=False`` gives the plain gradient.

    Optimizer state, as in insightface's ``partial_fc_v2``: the sampled rows are indexed out of the full
    ``weight`` inside autograd, so the unsampled rows get a zero gradient, not none. An optimizer with
    momentum or weight decay (SGD with ``momentum``, Adam/AdamW...) therefore still moves them (decay,
    and momentum from earlier steps). To freeze the unsampled rows exactly, give ``weight`` its own
    parameter group with plain SGD (``momentum=0, weight_decay=0``), or restore the rows outside
    ``sampled_classes`` (the global class ids this rank sampled at the last forward) after each step.

    Checkpoints. ``state_dict()`` holds this rank's shard and its metadata (``num_classes``,
    ``embedding_size``, ``shard_start``, ``shard_end``, ``world_size``). ``load_state_dict`` accepts a
    state of the same sharding, the full ``(C, D)`` weight (see :meth:`full_weight`), or the list of
    the state dicts of every rank of a run of any world size, re-sharded to this rank's classes
    (resuming on a different number of ranks). With a ``seed``, the state also holds the seed and this
    rank's sampling generator: loading a state of the same sharding and seed (alone, or in the list of
    a run of the same world size) resumes its stream, so that the next forward samples what the
    uninterrupted run would have. The per-rank streams cannot be mapped onto another sharding: loading
    the full weight, or the list of a run of another world size, restarts the stream from
    ``seed + rank``, as does a state saved with another seed.

    Args:
        embedding_size: ``D``. num_classes: ``C``.
        sample_rate: in ``(0, 1]``.
        margin_loss: the loss and its parameters, as :func:`margin_spec` reads them: ``"arcface"`` (the
            default, ``arcface_loss``'s defaults) or e.g. ``("cosface", {"scale": 64, "margin": 0.35})``.
        group: the process group (default: the default group; without ``torch.distributed``: one rank).
        ddp: whether the backbone is averaged over the ranks by DDP (see Gradients).
        seed: seeds this rank's sampling generator (``seed + rank``); ``None`` uses torch's global RNG.
        ignore_index: the label of the rows to ignore (excluded from the loss, its mean and the positives).
        impl: backend of the margin ops (see ``nckernels.backend``).
    """

    def __init__(self, embedding_size: int, num_classes: int, *, sample_rate: float = 0.1,
                 margin_loss: Union[str, tuple[str, Mapping]] = "arcface", group=None, ddp: bool = True,
                 seed: Optional[int] = None, ignore_index: int = -100, impl: str = "auto"):
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        _check_scalar("sample_rate", sample_rate, low=0.0, high=1.0, strict_low=True)
        if not isinstance(ddp, bool):
            raise TypeError(f"ddp must be a bool, got {ddp!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.margin = margin_spec(margin_loss)
        self.rank, self.world_size = rank_and_size(group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) must be at least the group size ({self.world_size})")
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, float(sample_rate)
        self.group, self.ddp, self.seed, self.ignore_index, self.impl = group, ddp, seed, ignore_index, impl
        self.shard_start, self.shard_end = self.shard_range(self.rank)
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (self.shard_end - self.shard_start, embedding_size)))
        self.sampled_classes: Optional[Tensor] = None
        self._generator: Optional[torch.Generator] = None
        self._loaded_rng: Optional[dict] = None  # a loaded generator state, set at the next sampling

    def shard_range(self, rank: int) -> tuple[int, int]:
        """The classes ``[start, end)`` of ``rank``."""
        return rank * self.num_classes // self.world_size, (rank + 1) * self.num_classes // self.world_size

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"classes=[{self.shard_start}, {self.shard_end}) of rank {self.rank}/{self.world_size}, "
                f"sample_rate={self.sample_rate}, margin={self.margin.op}, ddp={self.ddp}, "
                f"ignore_index={self.ignore_index}")

    # ------------------------------------------------------------------------- forward

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """The margin loss of the global batch (mean over the non-ignored rows of every rank), identical on
        every rank."""
        self._check_inputs(local_embeddings, local_labels)
        active = local_labels != self.ignore_index
        if not bool(active.all()):  # indexed inside autograd: the ignored rows get a zero gradient
            local_embeddings, local_labels = local_embeddings[active], local_labels[active]
        sizes = all_gather_sizes(local_embeddings.shape[0], self.group, local_embeddings.device)
        if sum(sizes) == 0:  # every row of every rank ignored: 0 (not 0 / 0), zero gradients, nothing sampled
            self.sampled_classes = local_labels.new_zeros(0, dtype=torch.int64)
            return local_embeddings.float().sum() + self.weight[:0].sum()
        labels = all_gather_rows(local_labels.long(), sizes, self.group)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):  # the gathered labels: every rank raises
            raise ValueError(f"local_labels contain class {int(labels[bad][0])} outside [0, {self.num_classes}) "
                             f"(and not ignore_index={self.ignore_index})")
        embeddings = gather_rows(local_embeddings, sizes, self.group, float(self.world_size) if self.ddp else 1.0)
        sample, target = self._sample(labels)
        centres = self.weight if sample is None else self.weight[sample]  # indexed inside autograd
        backend = _backend.choose(self.margin.op, self.impl, local_embeddings.device)
        (loss,) = sharded_rows(_MarginShard(target, self.margin, backend), embeddings, centres, group=self.group)
        return loss.mean()

    def _check_inputs(self, embeddings, labels):
        _check_tensor("local_embeddings", embeddings, dtypes=_FLOAT_DTYPES, ndim=2)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"local_embeddings have {embeddings.shape[1]} features, expected embedding_size = "
                             f"{self.embedding_size}")
        _check_tensor("local_labels", labels)
        if labels.is_floating_point() or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"local_labels must hold class indices as int64 or int32, got {labels.dtype}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"local_labels shape {tuple(labels.shape)} must be ({embeddings.shape[0]},)")
        for name, t in (("local_embeddings", embeddings), ("local_labels", labels)):
            if t.device != self.weight.device:
                raise ValueError(f"{name} is on {t.device} but the class centres are on {self.weight.device}")

    def _sample(self, labels: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """This rank's sampled centres (sorted indices into ``weight``; ``None``: all of them) and each row's
        target among them (-1 where its class belongs to another rank)."""
        size = self.shard_end - self.shard_start
        local = labels - self.shard_start
        mine = (local >= 0) & (local < size)
        if self.sample_rate == 1.0:
            self.sampled_classes = torch.arange(self.shard_start, self.shard_end, device=labels.device)
            return None, torch.where(mine, local, -1)
        positive = torch.zeros(size, dtype=torch.bool, device=labels.device)
        positive[local[mine]] = True
        wanted = math.ceil(round(self.sample_rate * size, 6))  # round: 0.3 * 20 is 6.000000000000001
        count = min(size, max(int(positive.sum()), wanted))
        score = torch.rand(size, generator=self._rng(labels.device), device=labels.device)
        score[positive] = 2.0  # above every uniform draw: the positives are always among the top `count`
        sample = score.topk(count).indices.sort().values
        self.sampled_classes = sample + self.shard_start
        target = torch.searchsorted(sample, local.clamp(0, size - 1))
        return sample, torch.where(mine, target, -1)

    def _rng(self, device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator, loaded, self._loaded_rng = torch.Generator(device), self._loaded_rng, None
            if loaded is not None and torch.device(loaded["device"]).type == self._generator.device.type:
                self._generator.set_state(loaded["state"].cpu())
            else:
                self._generator.manual_seed(self.seed + self.rank)
        return self._generator

    # ------------------------------------------------------------------------- checkpoints

    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """The ``(C, D)`` centres of all ranks (an all-gather: call it on every rank)."""
        sizes = [end - start for start, end in map(self.shard_range, range(self.world_size))]
        return all_gather_rows(self.weight.detach(), sizes, self.group)

    def _sharding(self) -> dict:
        """The sharding metadata of this rank's state dict."""
        return {"num_classes": self.num_classes, "embedding_size": self.embedding_size,
                "shard_start": self.shard_start, "shard_end": self.shard_end, "world_size": self.world_size}

    def _is_own(self, meta: Mapping) -> bool:
        """Whether ``meta`` describes this rank's shard of a run of the same world size."""
        return all(meta.get(k) == v for k, v in self._sharding().items())

    def get_extra_state(self) -> dict:
        """The sharding metadata; with a ``seed``, also the seed and this rank's sampling generator
        (``{"device", "state"}``; ``None`` before the first sampling of the stream from ``seed + rank``)."""
        state = self._sharding()
        if self.seed is not None:
            rng = self._loaded_rng
            if self._generator is not None:
                rng = {"device": str(self._generator.device), "state": self._generator.get_state()}
            state.update(seed=self.seed, sampling_rng=rng)
        return state

    def set_extra_state(self, state) -> None:
        """Resumes the sampling stream of a state of this sharding and seed (the metadata was checked before
        the weight was loaded); otherwise the next sampling restarts the stream from ``seed + rank``."""
        same = self._is_own(state) and state.get("seed") == self.seed
        self._generator, self._loaded_rng = None, state.get("sampling_rng") if same else None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also takes the full ``(C, D)`` weight, or the list of the state
        dicts of every rank of a run of any world size, re-sharded to this rank's classes."""
        if isinstance(state_dict, Tensor):
            state_dict = {"weight": state_dict}
        elif isinstance(state_dict, (list, tuple)):
            state_dict = self._reshard(state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight, meta = state_dict.get(prefix + "weight"), state_dict.get(prefix + "_extra_state")
        own = isinstance(meta, Mapping) and self._is_own(meta)  # on one rank, its own state is the full weight
        if isinstance(weight, Tensor) and tuple(weight.shape) == (self.num_classes, self.embedding_size) and not own:
            state_dict[prefix + "weight"] = weight[self.shard_start:self.shard_end]  # the full weight
            state_dict[prefix + "_extra_state"] = self._sharding()
        elif meta is not None:
            self._check_compatible(meta, "state_dict")
            if (meta["shard_start"], meta["shard_end"]) != (self.shard_start, self.shard_end):
                raise ValueError(
                    f"state_dict holds the classes [{meta['shard_start']}, {meta['shard_end']}) of a run on "
                    f"{meta['world_size']} ranks; this rank holds [{self.shard_start}, {self.shard_end}) of "
                    f"{self.world_size}: pass the list of every rank's state_dict, or the full weight, to re-shard")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_compatible(self, meta, what: str) -> None:
        if not isinstance(meta, Mapping) or not {"num_classes", "embedding_size", "shard_start",
                                                 "shard_end"} <= meta.keys():
            raise ValueError(f"{what} is not a PartialFC state_dict (no sharding metadata)")
        if (meta["num_classes"], meta["embedding_size"]) != (self.num_classes, self.embedding_size):
            raise ValueError(f"{what} is of a PartialFC with num_classes={meta['num_classes']}, embedding_size="
                             f"{meta['embedding_size']}; this one has {self.num_classes}, {self.embedding_size}")

    def _reshard(self, states: Sequence[Mapping]) -> dict:
        """This rank's state, assembled from the state dicts of all the ranks of a run of any world size."""
        shards, extra = [], self._sharding()
        for i, state in enumerate(states):
            if not isinstance(state, Mapping) or "weight" not in state:
                raise ValueError(f"state_dict[{i}] is not a PartialFC state_dict (no weight)")
            meta = state.get("_extra_state")
            self._check_compatible(meta, f"state_dict[{i}]")
            shards.append((meta["shard_start"], meta["shard_end"], state["weight"]))
            if self._is_own(meta):  # this rank's state (same world size): its sampling stream carries over
                extra = meta
        if tiled_size([(lo, hi) for lo, hi, _ in shards], "the shards of the state_dict list") != self.num_classes:
            raise ValueError(f"the shards of the state_dict list do not cover num_classes={self.num_classes}")
        start, end = self.shard_start, self.shard_end
        weight = torch.cat([w[max(lo, start) - lo:min(hi, end) - lo] for lo, hi, w in sorted(shards, key=lambda s: s[0])
                            if lo < end and start < hi])
        return {"weight": weight, "_extra_state": extra}
