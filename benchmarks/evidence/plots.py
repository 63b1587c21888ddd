"""The report's plots: one function per figure, each returning False when its section has no data."""

from __future__ import annotations

from pathlib import Path

from .harness import Run
from . import presets

PLOT_DPI = 110
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink", "tab:olive")


def row_color(key: str):
    """A model row's colour (by its place in presets.MODEL_ROWS), None for other keys (ablations)."""
    keys = [row.key for row in presets.MODEL_ROWS]
    return PALETTE[keys.index(key) % len(PALETTE)] if key in keys else None


def row_label(key: str) -> str:
    """The report's name for a results key: a model row's label, else the key (ablations) with ZeroS spelled out."""
    labels = {row.key: row.label for row in presets.MODEL_ROWS}
    return labels.get(key) or key.replace("zeros", "ZeroS")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bool:
    """Lay out, write and close a figure; True (the plot was made)."""
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    _plt().close(fig)
    return True


def plot_lm(run: Run, path: Path) -> bool:
    lm = run.results.get("lm") or {}
    if not lm:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finals, starts = [], []
    styles = [":", "--", "-."]
    for i, (name, r) in enumerate(lm.items()):
        xs = [c["tokens"] / 1e6 for c in r["curve"] if c["val_loss"] is not None]
        ys = [c["val_loss"] for c in r["curve"] if c["val_loss"] is not None]
        if not xs:
            continue
        if row_color(name):
            ax.plot(xs, ys, "-o", ms=3, color=row_color(name), label=row_label(name), lw=2)
        else:
            ax.plot(xs, ys, styles[i % 3], marker=".", color="tab:blue", alpha=0.7, label=name.replace("zeros", "ZeroS"))
        finals.append(min(ys))
        starts.append(ys[min(1, len(ys) - 1)])
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Language modelling, {run.preset.lm_layers} layers x {run.preset.lm_hidden}, seq {run.preset.lm_seq}")
    if finals:
        lo, hi = min(finals), max(starts)
        if hi > lo:
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_extrapolation(run: Run, path: Path) -> bool:
    ex = run.results.get("extrapolation") or {}
    if not ex.get("models"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    L = ex["eval_length"]
    # log-spaced bins: fine near the start, wide (less noisy) far out
    edges = sorted({0, *(round(L ** (i / 40)) for i in range(1, 41))})
    for attention_type, r in ex["models"].items():
        per = r["per_position"]
        xs = [max(1.0, (a + b) / 2) for a, b in zip(edges[:-1], edges[1:])]
        ys = [sum(per[a:b]) / (b - a) for a, b in zip(edges[:-1], edges[1:])]
        ax.plot(xs, ys, "-o", ms=3, color=row_color(attention_type) or "k", label=row_label(attention_type), lw=2)
    ax.set_xscale("log")
    ax.axvline(ex["train_length"], color="k", ls="--", lw=1, label=f"training length {ex['train_length']}")
    ax.set_xlabel("position in the sequence")
    ax.set_ylabel(f"loss (mean over {ex['windows']} windows, log-spaced bins)")
    ax.set_title(f"Length extrapolation: trained at {ex['train_length']}, evaluated at {L}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_mqar(run: Run, path: Path) -> bool:
    mq = run.results.get("mqar") or {}
    cells = [c for c in mq.get("cells", []) if c.get("accuracy") is not None]
    if not cells:
        return False
    plt = _plt()
    widths = sorted({c["width"] for c in cells})
    fig, axes = plt.subplots(1, len(widths), figsize=(4 * len(widths) + 0.5, 3.8), squeeze=False, sharey=True)
    for ax, width in zip(axes[0], widths):
        for key in dict.fromkeys(c.get("model", c["attention_type"]) for c in cells):
            pts = sorted((c["seq_len"], c["accuracy"]) for c in cells
                         if c["width"] == width and c.get("model", c["attention_type"]) == key)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", color=row_color(key) or "k", label=row_label(key))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c["seq_len"] for c in cells}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"width {width}")
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"MQAR, {mq.get('layers', 2)} layers (key-value pairs = length / 16)")
    return _save(fig, path)


def plot_contrast(run: Run, path: Path) -> bool:
    co = run.results.get("contrast") or {}
    if not co.get("models"):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"ZeroS, 1 head": ("tab:blue", "-"), "softmax, 1 head": ("tab:orange", "-"),
              "linear, 1 head": ("tab:green", "-")}
    for label, r in co["models"].items():
        pts = [(c["step"], c["relative_error"]) for c in r["curve"] if c["relative_error"] is not None]
        color, ls = styles.get(label, ("k", "-"))
        ax.plot([s for s, _ in pts], [e for _, e in pts], ls, marker="o", ms=3, color=color, label=label)
    ax.axhline(0.5, color="k", ls="--", lw=1, label="0.5: predicting x_first alone")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("relative squared error |pred - target|^2 / |target|^2")
    ax.set_title(f"Contrast, one layer: target x_first - x_second (dim {co['dim']}, length {co['seq_len']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {
    "lm_val_loss.png": plot_lm,
    "extrapolation.png": plot_extrapolation,
    "mqar.png": plot_mqar,
    "contrast.png": plot_contrast,
}


# The report
