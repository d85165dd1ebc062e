"""Pareto fronts, plots and the ``compare`` table of searches, from candidate records."""
from __future__ import annotations

from pathlib import Path


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower cost AND higher accuracy), sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_searches(searches: dict[str, list[dict]], out: Path, metric: str = "map50") -> Path:
    """mAP vs size and mAP vs BOPs (fractions of the float model), every candidate + each Pareto front."""
    import matplotlib  # only for the plot: kept out of the CLI's start-up
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (key, label) in zip(axes, [("compression_ratio", "weight storage (x smaller)"),
                                       ("bops_ratio", "BOPs (x fewer)")]):
        for name, recs in searches.items():
            pts = [(1.0 / r["metrics"][key], r["metrics"][metric]) for r in recs
                   if r["metrics"].get(metric) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            dots = ax.scatter([1 / x for x in xs], ys, s=10, alpha=0.35, label=f"{name} ({len(pts)})")
            front = pareto(pts)
            ax.plot([1 / pts[i][0] for i in front], [pts[i][1] for i in front], "-o", ms=3,
                    color=dots.get_facecolor()[0][:3])
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summary_row(name: str, recs: list[dict], metric: str = "map50") -> dict:
    """Best in-budget candidate of one search, with its cost and the search's totals."""
    ok = [r for r in recs if r["metrics"].get("meets_budget", 1) and r["metrics"].get(metric) is not None]
    best = max(ok, key=lambda r: r["metrics"]["reward"]) if ok else None
    m = best["metrics"] if best else {}
    return {"search": name, "candidates": len(recs), "best_episode": best["episode"] if best else None,
            metric: m.get(metric), "map50_95": m.get("map50_95"), "x_smaller": m.get("compression_ratio"),
            "x_fewer_bops": m.get("bops_ratio"), "x_fewer_flops": m.get("flops_ratio"),
            "size_bytes": m.get("size_bytes"), "mean_bits": best["params"].get("mean_weight_bits") if best else None,
            "mean_sparsity": best["params"].get("mean_sparsity") if best else None}


def format_table(rows: list[dict]) -> str:
    cols = list(rows[0]) if rows else []
    def fmt(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
