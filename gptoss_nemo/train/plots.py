"""End-of-run pictures: loss curves (LM, validation, aux) and the per-layer expert-load heatmap."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_losses(rows: list[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, aux_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("lm_loss", "train LM loss"), ("val_loss", "validation LM loss")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "val_loss" else None, label=label)
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    pts = [(r["step"], r["aux_loss"]) for r in rows if r.get("aux_loss") is not None]
    if pts:
        aux_ax.plot(*zip(*pts), color="tab:red")
    aux_ax.set_xlabel("step"), aux_ax.set_ylabel("load-balancing loss (1 = balanced)"), aux_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def plot_expert_load(tokens: torch.Tensor, out: str | Path) -> Path:
    """tokens: [layers, experts] routed-token counts; each row shown as a share of that layer's tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = tokens.double() / tokens.double().sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(max(6, tokens.shape[1] * 0.25), max(3, tokens.shape[0] * 0.25)))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert"), ax.set_ylabel("layer"), ax.set_title("share of routed tokens per expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
