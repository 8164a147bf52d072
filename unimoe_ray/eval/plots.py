"""PNG figures (matplotlib, Agg backend: no display needed) next to the JSON that holds their
numbers: routing (paper Fig. 3 and Fig. 5) for `jobs/analyze_routing.py` and the curriculum
experiment, and the experiment's loss curves.

- `plot_routing(report, out)`: from `train.routing.routing_report` — experts_per_token.png
  (per layer, the share of tokens using k routed experts, | the mean), experts_per_token_by_task.png
  (per layer and task, the mean routed experts per token) and expert_share_by_task.png (per
  layer, each routed expert's share of a task's tokens);
- `plot_loss_curves(curves, out)`: per variant, train loss per step and validation loss at its
  points against the training FLOPs spent, the mean over seeds with a min–max band.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing(report: dict, out: str | Path, prefix: str = "") -> list[Path]:
    """The three routing figures of one report; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers, E, tasks = report["layers"], report["num_routed"], report["tasks"]
    paths = []

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.6 * (E + 1)), max(3.0, 1.0 + 0.35 * len(layers))))
    im = ax.imshow([lay["k_share"] for lay in layers], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for y, lay in enumerate(layers):
        ax.plot(lay["mean_routed_experts"], y, "w|", markersize=14, mew=2)
    ax.set(
        xlabel="routed experts per token (| = mean)",
        ylabel="layer",
        xticks=range(E + 1),
        title="Share of tokens by number of routed experts",
    )
    fig.colorbar(im, ax=ax, label="share of tokens")
    fig.tight_layout()
    paths.append(_save(fig, out / f"{prefix}experts_per_token.png"))

    fig, ax = plt.subplots(figsize=(6.0, 3.5))
    x = [lay["layer"] for lay in layers]
    for t in tasks:
        ax.plot(x, [lay["mean_routed_experts_by_task"][t] for lay in layers], marker="o", label=t)
    ax.set(
        xlabel="layer",
        ylabel="routed experts per token",
        xticks=x,
        ylim=(0, E),
        title="Mean routed experts per token, by task",
    )
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out / f"{prefix}experts_per_token_by_task.png"))

    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.8 + 0.4 * len(tasks) * rows), squeeze=False)
    for i, lay in enumerate(layers):
        ax = axes[i // cols][i % cols]
        im = ax.imshow([lay["expert_share_by_task"][t] for t in tasks], aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set(
            title=f"layer {lay['layer']}", xticks=range(E), yticks=range(len(tasks)), yticklabels=tasks, xlabel="expert"
        )
    for j in range(len(layers), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share of the task's tokens")
    fig.suptitle("Routed expert's share of each task's tokens")
    paths.append(_save(fig, out / f"{prefix}expert_share_by_task.png"))
    return paths


def _band(series: list[list[tuple[float, float]]], smooth: int = 1, points: int = 200):
    """Each seed's (x, y) points (after a running mean of `smooth` points) interpolated onto a
    common grid over the x range every seed covers → grid, mean, min and max over seeds."""
    xs, ys = [], []
    for pts in series:
        x = np.asarray([p[0] for p in pts], dtype=np.float64)
        y = np.asarray([p[1] for p in pts], dtype=np.float64)
        if smooth > 1 and len(y) >= smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            x = x[smooth - 1 :]
        xs.append(x)
        ys.append(y)
    grid_X = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), points)
    Y = np.asarray([np.interp(grid_X, x, y) for x, y in zip(xs, ys)])
    return grid_X, Y.mean(0), Y.min(0), Y.max(0)


def plot_loss_curves(curves: dict[str, dict[str, list]], budget: float, out: str | Path, smooth: int = 5) -> Path:
    """curves: variant → {"train": per seed [(flops, ce), ...], "val": per seed [(flops, loss), ...]}
    (validation loss: the mean over tasks). x axis: the fraction of the FLOP budget spent."""
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (variant, c) in enumerate(curves.items()):
        color = f"C{i}"
        if c.get("train"):
            grid_X, mean, lo, hi = _band(c["train"], smooth)
            ax_t.plot(grid_X / budget, mean, color=color, label=variant)
            ax_t.fill_between(grid_X / budget, lo, hi, color=color, alpha=0.2, linewidth=0)
        if c.get("val"):
            # Every seed has the same validation points (the same phases), at nearly equal FLOPs.
            n = min(len(seed) for seed in c["val"])
            xv = [np.mean([seed[j][0] for seed in c["val"]]) / budget for j in range(n)]
            yv = np.asarray([[seed[j][1] for seed in c["val"]] for j in range(n)])
            ax_v.errorbar(
                xv,
                yv.mean(1),
                yerr=[yv.mean(1) - yv.min(1), yv.max(1) - yv.mean(1)],
                color=color,
                marker="o",
                capsize=3,
                label=variant,
            )
    ax_t.set(
        xlabel="training FLOPs spent / budget",
        ylabel="train loss (Σ codebook CE)",
        title=f"Train loss (running mean of {smooth} steps; band: min–max over seeds)",
    )
    ax_v.set(
        xlabel="training FLOPs spent / budget",
        ylabel="validation loss (mean over tasks)",
        title="Validation loss (mean over seeds; bars: min–max)",
    )
    for ax in (ax_t, ax_v):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)
