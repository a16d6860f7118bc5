"""Chunked PyTorch linear cross-entropy: the executable spec and the CPU path.

For token ``i`` with hidden row ``x_i`` and target ``y_i``, logits ``z_ij = x_i . w_j + b_j``,
optionally soft-capped ``z'_ij = c tanh(z_ij / c)``, ``lse_i = log sum_j exp z'_ij`` and, with
class weights ``omega`` (all ones when absent) and smoothing ``eps``::

    loss_i = (1 - eps) omega_y (lse_i - z'_iy) + eps / V * sum_j omega_j (lse_i - z'_ij)
             + z_loss * omega_y * lse_i ** 2

which is PyTorch's ``cross_entropy`` per-token loss (the smoothing term included) plus the
PaLM z-loss, weighted like the token. The gradient w.r.t. the capped logits is::

    dL/dz'_ij = a_i p_ij - b_i [j = y_i] - c_i omega_j,    p = softmax(z'_i)

with per-token coefficients ``a, b, c`` from :func:`grad_coefficients`; soft-capping
multiplies it by ``1 - (z'_ij / c)**2``. Rows are processed in chunks so that the peak
extra memory stays under ``chunk_bytes`` (default 96 MiB, env
``NCKERNELS_REFERENCE_CHUNK_MB``): the ``N x V`` logits never exist.

``rows_forward`` / ``rows_backward_`` are the per-chunk epilogues; the C++ extension
provides the same two functions (``impl="cpp"``), fused into one pass over the chunk.
"""
from __future__ import annotations

import os

import torch

# 96 MiB: chunks of logits near 32 MiB, which the allocator reuses; larger ones are fresh mmaps whose
# page faults cost more than the bigger matmuls save (benchmarks/results/cpu_linear_ce.md)
DEFAULT_CHUNK_BYTES = 96 * 2**20


def chunk_bytes() -> int:
    mb = os.environ.get("NCKERNELS_REFERENCE_CHUNK_MB")
    return int(float(mb) * 2**20) if mb else DEFAULT_CHUNK_BYTES


def split_lse(m, log_sum):
    """``lse = m + log_sum`` as an fp32 pair ``(hi, lo)``, ``hi = fl(lse)``, ``lo`` its rounding residual
    (``m`` is the row max, or 0 where that is infinite, and ``log_sum = log sum_j exp(z_j - m)``)."""
    hi = m + log_sum
    return hi, torch.where(hi.isfinite(), (m - hi) + log_sum, 0.0)


def rows_forward(z, target, class_weight, label_smoothing, softcap):
    """Per-row ``(lse, lse_lo, z'_target, sum_j omega_j z'_j)`` of raw fp32 logits ``z`` (n x V); the LSE is
    the fp32 pair of :func:`split_lse`, so that ``(lse - z'_y) + lse_lo`` resolves losses below ``ulp(lse)``."""
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    m = z.amax(-1)
    m = torch.where(m.isinf(), 0.0, m)
    lse, lse_lo = split_lse(m, torch.log(torch.exp(z - m[:, None]).sum(-1)))
    z_target = z.gather(1, target[:, None]).squeeze(1)
    if label_smoothing > 0:
        z_smooth = (z @ class_weight) if class_weight is not None else z.sum(-1)
    else:
        z_smooth = torch.zeros_like(lse)
    return lse, lse_lo, z_target, z_smooth


def rows_backward_(z, target, class_weight, lse, lse_lo, coef_p, coef_target, coef_uniform, softcap):
    """Overwrite raw fp32 logits ``z`` (n x V) with ``dL/dz`` (see the module docstring);
    ``p = exp((z' - lse) - lse_lo)``."""
    if softcap > 0:
        z.div_(softcap).tanh_()  # t = tanh(z / c); z' = c t; dz'/dz = 1 - t^2
        tanh = z.clone()
        z.mul_(softcap)
    z.sub_(lse[:, None]).sub_(lse_lo[:, None]).exp_().mul_(coef_p[:, None])
    z.scatter_add_(1, target[:, None], -coef_target[:, None])
    if class_weight is not None:
        z.addr_(coef_uniform, class_weight, alpha=-1.0)
    else:
        z.sub_(coef_uniform[:, None])
    if softcap > 0:
        z.mul_(1 - tanh * tanh)
    return z


def token_loss(lse, z_target, z_smooth, omega_target, smooth_total, label_smoothing, z_loss, num_classes,
               lse_lo=0.0):
    """Per-token loss from the row statistics (all fp32 vectors). ``lse_lo`` is the rounding residual
    of ``lse`` when known: ``(lse - z_y) + lse_lo`` keeps losses far below ``ulp(lse)``."""
    loss = (1 - label_smoothing) * omega_target * ((lse - z_target) + lse_lo)
    if label_smoothing > 0:
        loss = loss + label_smoothing / num_classes * (smooth_total * (lse + lse_lo) - z_smooth)
    if z_loss > 0:
        loss = loss + z_loss * omega_target * lse * lse
    return torch.where(lse.isinf(), float("nan"), loss)  # an infinite logit: NaN, as in F.cross_entropy


def grad_coefficients(grad_loss, grad_lse, lse, omega_target, smooth_total, label_smoothing, z_loss, num_classes):
    """Per-token ``(a, b, c)`` with ``dL/dz'_ij = a_i p_ij - b_i [j = y_i] - c_i omega_j``."""
    eps = label_smoothing
    b = grad_loss * (1 - eps) * omega_target
    c = grad_loss * (eps / num_classes)
    a = b + c * smooth_total + grad_lse
    if z_loss > 0:
        a = a + grad_loss * (2 * z_loss) * omega_target * lse
    return a, b, c


def _row_chunks(n_rows, num_classes, budget):
    # logits chunk (fp32) plus the softcap/temporaries: about 3 fp32 copies per element
    rows = max(1, budget // max(1, 3 * 4 * num_classes))
    for start in range(0, n_rows, rows):
        yield start, min(n_rows, start + rows)


def _logits(x, w, bias):
    """fp32 logits of a row chunk; low-precision inputs are multiplied in their dtype (fp32
    accumulation where the device's matmul offers an fp32 output, as on CUDA)."""
    if x.dtype == torch.float32 or x.device.type != "cuda":
        z = (x @ w.T).float()
    else:
        z = torch.mm(x, w.T, out_dtype=torch.float32)
    if bias is not None:
        z += bias.float()
    return z


def forward(x, w, bias, rows, target, class_weight, label_smoothing, softcap, budget=None, epilogue=rows_forward):
    """Row statistics (``epilogue``'s, by default ``(lse, lse_lo, z'_target, z_smooth)``) of the hidden rows
    ``x[rows]``."""
    return map_row_chunks(rows.numel(), w.shape[0], x.device, budget, lambda lo, hi: epilogue(
        _logits(x[rows[lo:hi]], w, bias), target[lo:hi], class_weight, label_smoothing, softcap))


def map_row_chunks(n_rows, num_classes, device, budget, stats_of):
    """The fp32 per-row statistics ``stats_of(lo, hi)`` (a tuple of vectors of rows ``lo:hi``) over chunks
    of rows whose fp32 logits fit ``budget`` (default :func:`chunk_bytes`), concatenated (no rows: one empty
    chunk)."""
    out = None
    for lo, hi in list(_row_chunks(n_rows, num_classes, budget or chunk_bytes())) or [(0, 0)]:
        stats = stats_of(lo, hi)
        out = out or [torch.empty(n_rows, dtype=torch.float32, device=device) for _ in stats]
        for o, r in zip(out, stats):
            o[lo:hi] = r
    return tuple(out)


def backward(x, w, bias, rows, target, class_weight, lse, lse_lo, coef_p, coef_target, coef_uniform, softcap,
             budget=None, epilogue=rows_backward_):
    """``(dx, dw, db)`` of ``sum_i (a_i lse_i - b_i z'_iy - c_i sum_j omega_j z'_ij)``, exact fp32 accumulation."""
    return _gradient_pass(x, w, bias, rows, target, class_weight, softcap, budget, epilogue,
                          lambda lo, hi, z: (lse[lo:hi], lse_lo[lo:hi], coef_p[lo:hi], coef_target[lo:hi],
                                             coef_uniform[lo:hi]))


def forward_backward(x, w, bias, rows, target, class_weight, label_smoothing, z_loss, softcap, grad_loss, omega_target,
                     smooth_total, budget=None, epilogue=rows_forward, backward_epilogue=rows_backward_):
    """Row statistics ``(lse, lse_lo, z'_target, z_smooth)`` and ``(dx, dw, db)`` for a per-token upstream gradient
    ``grad_loss`` known at forward time (the mean and sum reductions), in one pass over the chunks: each
    chunk's logits are computed once, instead of again in the backward."""
    V, n = w.shape[0], rows.numel()
    stats = [torch.empty(n, dtype=torch.float32, device=x.device) for _ in range(4)]
    no_lse_grad = torch.zeros_like(grad_loss)

    def coefficients(lo, hi, z):
        chunk = epilogue(z, target[lo:hi], class_weight, label_smoothing, softcap)
        for o, r in zip(stats, chunk):
            o[lo:hi] = r
        return chunk[:2] + grad_coefficients(grad_loss[lo:hi], no_lse_grad[lo:hi], chunk[0], omega_target[lo:hi],
                                               smooth_total, label_smoothing, z_loss, V)

    grads = _gradient_pass(x, w, bias, rows, target, class_weight, softcap, budget, backward_epilogue, coefficients)
    return tuple(stats), grads


def _gradient_pass(x, w, bias, rows, target, class_weight, softcap, budget, epilogue, coefficients):
    """Chunk loop of the gradients: ``coefficients(lo, hi, z)`` gives each chunk's ``(lse, lse_lo, a, b, c)``."""
    budget = budget or chunk_bytes()
    n, V = rows.numel(), w.shape[0]
    dx = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    db = torch.zeros(V, dtype=torch.float32, device=w.device) if bias is not None else None
    for lo, hi in _row_chunks(n, V, budget):
        xr = x[rows[lo:hi]]
        z = _logits(xr, w, bias)
        dz = epilogue(z, target[lo:hi], class_weight, *coefficients(lo, hi, z), softcap)
        dx[rows[lo:hi]] = (dz.to(w.dtype) @ w).to(x.dtype)
        dw.addmm_(dz.T, xr.float())
        if db is not None:
            db += dz.sum(0)
        del z, dz  # free this chunk before the next one is allocated
    return dx, dw.to(w.dtype), (db.to(bias.dtype) if db is not None else None)
