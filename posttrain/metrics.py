"""Run metrics: JSONL (one object per step), TensorBoard, optional W&B, PNG plots at the end.

Only rank 0 writes. On resume the JSONL is cut back to the checkpoint's step
so that the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from posttrain.config.schema import LoggingConfig

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, output_dir: Path, cfg: LoggingConfig, *, enabled: bool, run_name: str,
                 resume_step: int | None, config: dict) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.cfg = cfg
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if resume_step is None:
            self.path.write_text("")
        else:  # drop what the interrupted run logged after its last checkpoint
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; TensorBoard logging is off")
        if cfg.wandb:
            try:
                import wandb

                self._wandb = wandb.init(project=cfg.wandb_project, name=run_name, config=config,
                                         resume="allow")
            except ImportError:
                log.warning("logging.wandb is true but wandb is not installed; W&B logging is off")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self, plot_keys: list[list[str]] | None = None) -> list[Path]:
        """Flush writers and draw the plots; returns the PNG paths written."""
        if not self.enabled:
            return []
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if not self.cfg.plots:
            return []
        return plot_metrics(self.path, self.output_dir / "plots", plot_keys)


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def plot_metrics(metrics_path: Path, out_dir: Path, groups: list[list[str]] | None = None) -> list[Path]:
    """One PNG per group of keys (curves sharing axes), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        return []
    if groups is None:
        keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
        groups = [[k] for k in keys]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group in groups:
        series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in group}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(series))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / ("_".join(series).replace("/", "-") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
