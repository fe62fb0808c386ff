"""A sweep's results: one row per trial, the best trial, and the outputs (sweep.json, sweep.md, sweep.png).
`dims` are the `app.sweep.Dimension`s of the space."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def sweep_rows(results, dims: list, max_steps: Optional[int]) -> list[dict[str, Any]]:
    """One row per trial. DONE: the trial function finished and made its final report (it carries the run
    name); STOPPED: the scheduler stopped it after one of the training loop's reports, possibly the one at
    the last step (ASHA's top rung can fall on max_steps), before its stage could finish."""
    rows = []
    for result in results:
        cfg = result.config or {}
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        info = result.metrics or {}
        rows.append({"trial_id": info.get("trial_id") or Path(str(result.path)).name,
                     "params": {d.key: cfg.get(d.key) for d in dims},
                     "status": "ERROR" if result.error else (
                         "STOPPED" if max_steps and not info.get("run_name") else "DONE"),
                     "metrics": metrics, "checkpoint": info.get("checkpoint") or info.get("checkpoint_path"),
                     "mlflow_run_id": info.get("mlflow_run_id"), "run_name": info.get("run_name"),
                     "steps": info.get("step"),
                     "error": str(result.error).splitlines()[0][:300] if result.error else None})
    return sorted(rows, key=lambda r: r["trial_id"])


def pick_best(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    """The best trial among those that ran to the end: a trial ASHA stopped early reports an earlier
    step's metric (not comparable) and has no final checkpoint. Falls back to stopped trials only when
    none finished."""
    scored = [r for r in rows if r["status"] != "ERROR" and isinstance(r["metrics"].get(metric), (int, float))]
    finished = [r for r in scored if r["status"] == "DONE"]
    candidates = finished or scored
    if not candidates:
        return None
    return (min if mode == "min" else max)(candidates, key=lambda r: r["metrics"][metric])


def format_rows(rows: list[dict], dims: list, metric: str) -> str:
    head = ["trial", *(d.key for d in dims), metric, "steps", "status"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        value = r["metrics"].get(metric)
        cells = [r["trial_id"], *(f"{r['params'].get(d.key)}" for d in dims),
                 f"{value:.4g}" if isinstance(value, (int, float)) else "-", str(r.get("steps") or "-"), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_outputs(summary: dict, dims: list, out: Path) -> None:
    """sweep.json (everything), sweep.md (the table) and sweep.png (metric against each numeric key)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "sweep.md").write_text(format_rows(summary["trials"], dims, summary["metric"]) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    plotted = [d for d in dims if any(isinstance(r["params"].get(d.key), (int, float)) for r in summary["trials"])]
    panels = plotted or dims[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, d in zip(axes[0], panels):
        points = [(r["params"].get(d.key), r["metrics"].get(metric)) for r in summary["trials"]
                  if isinstance(r["metrics"].get(metric), (int, float))]
        xs = [p[0] for p in points]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [p[1] for p in points])
        if numeric and xs and min(xs) > 0 and (d.kind == "loguniform" or max(xs) / min(xs) >= 50):
            ax.set_xscale("log")
        elif numeric and xs and min(xs) == 0 and max(xs) >= 50:  # e.g. align weights 0, 10, 100
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel(d.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['name']}: {metric} per trial ({summary['mode']} is best)")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)
