"""Outputs of ``nckernels collapse``: metrics.json, classes.csv, PNG plots, terminal tables."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

SUMMARY_KEYS = ("nc1_quotient", "nc1_pinv", "cdnv", "equinorm_means", "equinorm_weights", "equiangularity",
                "max_angle", "gnc2_mean", "gnc2_var", "nc3_duality", "nc3_mean_cos", "unc3", "nc4", "nc4_class_mean")


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_metrics(path: Path, metrics: dict, provenance: dict):
    """``metrics.json``: ``{"metrics": ..., "conventions": ..., "bands": ..., "provenance": ...}`` (NaN as null)."""
    body = {"metrics": {k: v for k, v in metrics.items() if k not in ("conventions", "bands")},
            "conventions": metrics.get("conventions", {}), "bands": metrics.get("bands", []), "provenance": provenance}
    path.write_text(json.dumps(_json_safe(body), indent=2) + "\n")


def write_classes(path: Path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_plots(out: Path, metrics: dict, rows: list[dict]) -> list[Path]:
    """CDNV and NC4 agreement by token-frequency band; histograms of cos(w_c, mu_c - mu_G) and of
    ||mu_c - mu_G||; per-class variance against token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    bands = [b for b in metrics.get("bands", []) if b["classes"] > 0]
    if bands:
        labels = [f"[{b['lo']}, {b['hi'] if b['hi'] is not None else 'inf'})" for b in bands]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.bar(labels, [b["cdnv"] if b["cdnv"] is not None and math.isfinite(b["cdnv"]) else 0 for b in bands])
        ax1.set_yscale("log")
        ax1.set(title="CDNV within each frequency band", xlabel="training count of the class", ylabel="CDNV")
        ax2.bar(labels, [b.get("nc4", math.nan) for b in bands])
        ax2.set(title="NC4: NCC / linear agreement", xlabel="training count of the label", ylabel="agreement",
                ylim=(0, 1))
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        paths.append(out / "bands.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fin = [r for r in rows if r["count"] > 0 and math.isfinite(r["mean_norm"])]
    for key, title, name in (("weight_cos", "cos(w_c, mu_c - mu_G)", "weight_cos.png"),
                             ("mean_norm", "||mu_c - mu_G||", "mean_norms.png")):
        values = [r[key] for r in fin if math.isfinite(r[key])]
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(values, bins=60)
        ax.set(title=f"{title} over {len(values)} classes", xlabel=title, ylabel="classes")
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    var = [(r["count"], r["variance"]) for r in fin if math.isfinite(r["variance"]) and r["count"] > 1]
    if var:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([c for c, _ in var], [v for _, v in var], s=3, alpha=0.5)
        ax.set(xscale="log", yscale="log", title="within-class variance vs frequency", xlabel="training count",
               ylabel="tr Sigma_c")
        fig.tight_layout()
        paths.append(out / "variance_vs_count.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def summary(metrics: dict, provenance: dict) -> str:
    lines = [f"model  {provenance.get('model')}  ({provenance.get('architecture')}, {provenance.get('dtype')})",
             f"corpus {provenance.get('corpus')}: {provenance.get('train_tokens')} training tokens, "
             f"{provenance.get('heldout_tokens')} held out; {metrics['conventions']['classes']} classes "
             f"with >= {metrics['conventions']['effective_min_count']} tokens",
             f"{'metric':<18}{'value':>14}"]
    lines += [f"{k:<18}{_fmt(metrics[k]):>14}" for k in SUMMARY_KEYS if k in metrics]
    if metrics.get("bands"):
        lines.append(f"{'band (count)':<18}{'classes':>9}{'tokens':>10}{'CDNV':>12}{'NC4':>10}")
        for b in metrics["bands"]:
            band = "[{}, {})".format(b["lo"], b["hi"] if b["hi"] is not None else "inf")
            lines.append(f"{band:<18}{b['classes']:>9}{b['tokens']:>10}{_fmt(b['cdnv']):>12}{_fmt(b.get('nc4')):>10}")
    return "\n".join(lines)


def compare(paths) -> str:
    """Two (or more) metrics.json side by side, with the relative change of the last against the first."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    names = [Path(p).parent.name or str(p) for p in paths]
    width = max(14, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<18}" + "".join(f"{n:>{width}}" for n in names) + f"{'change':>10}"]
    keys = [k for k in SUMMARY_KEYS if any(k in r["metrics"] for r in runs)]
    keys += ["train_tokens", "heldout_tokens"]
    for k in keys:
        vals = [r["metrics"].get(k, r["provenance"].get(k)) for r in runs]
        change = ""
        a, b = vals[0], vals[-1]
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a:
            change = f"{(b - a) / abs(a):+.1%}"
        lines.append(f"{k:<18}" + "".join(f"{_fmt(v):>{width}}" for v in vals) + f"{change:>10}")
    for key in ("model", "corpus"):
        lines.append(f"{key:<18}" + "".join(f"{str(r['provenance'].get(key))[-width + 2:]:>{width}}" for r in runs))
    return "\n".join(lines)
