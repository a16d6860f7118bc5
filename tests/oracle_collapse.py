"""Float64 naive oracles for the neural-collapse statistics and metrics.

Written for clarity, not speed: per-class Python loops over explicit float64 tensors, full
``K x K`` pair matrices, explicit covariance matrices. Nothing here shares code with nckernels.
"""
from __future__ import annotations

import math

import torch


def class_stats(features, labels, num_classes, ignore_index=-100):
    """``(counts, sums, m2, scatter)`` by a loop over classes, in float64."""
    h = features.reshape(-1, features.shape[-1]).double().cpu()
    y = labels.reshape(-1).long().cpu()
    D = h.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.int64)
    sums = torch.zeros(num_classes, D, dtype=torch.float64)
    m2 = torch.zeros(num_classes, dtype=torch.float64)
    scatter = torch.zeros(D, D, dtype=torch.float64)
    for c in range(num_classes):
        rows = h[y == c]
        counts[c] = rows.shape[0]
        if rows.shape[0] == 0:
            continue
        sums[c] = rows.sum(0)
        r = rows - rows.mean(0)
        m2[c] = (r * r).sum()
        scatter += r.T @ r
    return counts, sums, m2, scatter


def metrics(features, labels, num_classes, weight=None, *, global_mean="class_means", unbiased=False,
            min_count=1, cdnv_power=1):
    """Every key of ``nckernels.collapse.metrics.compute`` (no NC4, no bands) from raw rows."""
    h = features.reshape(-1, features.shape[-1]).double().cpu()
    y = labels.reshape(-1).long().cpu()
    threshold = max(min_count, 2 if unbiased else 1)
    classes = [c for c in range(num_classes) if int((y == c).sum()) >= threshold]
    K = len(classes)
    means = torch.stack([h[y == c].mean(0) for c in classes])
    counts = torch.tensor([int((y == c).sum()) for c in classes], dtype=torch.float64)
    var = torch.tensor([float(((h[y == c] - h[y == c].mean(0)) ** 2).sum()) for c in classes], dtype=torch.float64)
    var = var / (counts - 1 if unbiased else counts)
    if global_mean == "sample":
        mu_g = (means * counts[:, None]).sum(0) / counts.sum()
    else:
        mu_g = means.mean(0)
    M = means - mu_g
    out = {}
    # NC1
    within = sum(float(((h[y == c] - h[y == c].mean(0)) ** 2).sum()) for c in classes) / counts.sum()
    out["nc1_quotient"] = float(within / ((M ** 2).sum(1).mean()))
    seen = [c for c in range(num_classes) if int((y == c).sum()) > 0]
    R = torch.cat([h[y == c] - h[y == c].mean(0) for c in seen])
    sigma_w = R.T @ R / R.shape[0]
    sigma_b = M.T @ M / K
    out["nc1_pinv"] = float(torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / K)
    # pairs
    cdnv, cos, log_inv = [], [], []
    for i in range(K):
        for j in range(i + 1, K):
            d2 = float(((means[i] - means[j]) ** 2).sum())
            if d2 > 0:
                cdnv.append((var[i] + var[j]) / (2 * d2 ** cdnv_power))
            c = float(M[i] @ M[j] / (M[i].norm() * M[j].norm()))
            cos.append(c)
            u = M[i] / M[i].norm() - M[j] / M[j].norm()
            log_inv.append(-math.log(float(u.norm())))
    cos_t = torch.tensor(cos, dtype=torch.float64)
    log_t = torch.tensor(log_inv, dtype=torch.float64)
    out["cdnv"] = float(torch.tensor(cdnv).mean())
    out["equiangularity"] = float(cos_t.std(correction=0))
    out["max_angle"] = float((cos_t + 1 / (K - 1)).abs().mean())
    out["gnc2_mean"] = float(log_t.mean())
    out["gnc2_var"] = float(log_t.var(correction=0))
    norms = M.norm(dim=1)
    out["equinorm_means"] = float(norms.std(correction=0) / norms.mean())
    if weight is not None:
        W = weight.double().cpu()[classes]
        wn = W.norm(dim=1)
        out["equinorm_weights"] = float(wn.std(correction=0) / wn.mean())
        out["nc3_duality"] = float(((W / W.norm() - M / M.norm()) ** 2).sum())
        cosw = torch.stack([W[k] @ M[k] / (W[k].norm() * M[k].norm()) for k in range(K)])
        out["nc3_mean_cos"] = float(cosw.mean())
        out["unc3"] = float(cosw.std(correction=0) / cosw.mean())
    return out


def nc4_predictions(features, means, weight, bias=None, class_mask=None):
    """Full-matrix float64 ``(argmax logits, argmin distance over candidate classes)``."""
    h = features.double().cpu()
    logits = h @ weight.double().cpu().T
    if bias is not None:
        logits = logits + bias.double().cpu()
    dist = torch.cdist(h, means.double().cpu().nan_to_num())
    mask = means.isfinite().all(1).cpu()
    if class_mask is not None:
        mask &= class_mask.cpu()
    dist[:, ~mask] = math.inf
    return logits.argmax(1), dist.argmin(1)
