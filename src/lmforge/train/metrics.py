"""Run logging: one JSON object per log step in metrics.jsonl, and PNG plots of the curves."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, enabled: bool = True, append: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append and self.path.exists():
                self.path.unlink()

    def log(self, **row) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows a killed run logged after its last checkpoint (they will be redone)."""
        if not (self.enabled and self.path.exists()):
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill mid-write
    return rows


def plot_curves(metrics_path: str | Path, out_png: str | Path, title: str = "",
                keys: tuple[str, ...] = ("loss", "val_loss"), ylabel: str = "loss (nats/token)") -> Path | None:
    """Loss (and any other requested keys) vs step, one PNG. Returns None when there is nothing to plot."""
    rows = read_metrics(metrics_path)
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
