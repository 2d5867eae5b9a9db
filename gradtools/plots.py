"""Figures for the book, matplotlib only.

Every function builds a fresh :class:`matplotlib.figure.Figure` (not through
``pyplot``, so nothing is shown twice or leaks between cells) and returns it;
none calls ``plt.show()``. One palette across the book: PyTorch and Keras keep
their colours, clipped and unclipped runs keep theirs. A label that names a
clipping state ("clipped", "unclipped") takes that colour; otherwise a label
naming a framework takes the framework's; line styles tell the rest apart.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

__all__ = ["PALETTE", "loss_curves", "gradient_flow", "curves", "norm_history", "lr_range_curve",
           "quadratic_trajectory", "update_ratios", "sharpness_curve", "lr_schedules", "gradient_through_time",
           "loss_surface", "defence_matrix"]

#: Colours used everywhere in the book.
PALETTE = {
    "torch": "#EE4C2C",  # PyTorch orange-red
    "keras": "#1F5FAD",  # Keras blue
    "unclipped": "#D62728",
    "clipped": "#2CA02C",
    "threshold": "#555555",
    "spike": "#9467BD",
    "boundary": "#FF7F0E",
}

_CYCLE = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F"]


def _color(label: str, i: int) -> str:
    """Colour by meaning: clipping state first ("unclipped"/"clipped"), then framework."""
    key = label.lower()
    if "unclipped" in key:
        return PALETTE["unclipped"]
    if "clipped" in key:
        return PALETTE["clipped"]
    if "keras" in key:
        return PALETTE["keras"]
    if "torch" in key:
        return PALETTE["torch"]
    return _CYCLE[i % len(_CYCLE)]


def _figure(figsize=(6.4, 3.6)):
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, logy: bool = False, legend: dict | None = None) -> Figure:
    """Labels, title, optional log y-axis and a legend: what every figure of the book has."""
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(**{"fontsize": 8, **(legend or {})})
    return fig


def loss_curves(curves: dict, title: str = "Training loss", logy: bool = True, blowup: float = 1e6,
                styles: dict | None = None) -> Figure:
    """Loss against step, one line per entry of ``curves`` (label -> losses).

    A curve that becomes non-finite (or exceeds ``blowup``) is drawn up to its
    last finite point and marked there with an ``x`` (legend: "diverged at step
    N"; on the axes: "non-finite at step N"), instead of silently ending.

    Args:
        styles: label -> extra ``Axes.plot`` keywords for that curve; a ``color``
            there replaces the book's colour (by clipping state, then framework),
            e.g. to colour by initialisation and dash by framework.
    """
    from gradtools.maths import divergence_step

    fig, ax = _figure()
    styles = styles or {}
    n_steps = max((len(v) for v in curves.values()), default=1)
    for i, (label, losses) in enumerate(curves.items()):
        losses = np.asarray(losses, dtype=float)
        steps = np.arange(len(losses))
        style = {"color": _color(label, i), **styles.get(label, {})}
        color = style["color"]
        d = divergence_step(losses, blowup=blowup)
        shown = losses if d is None else losses[:d]
        ax.plot(steps[: len(shown)], shown, label=label, **style)
        if d is not None:
            y = shown[-1] if len(shown) else 1.0
            ax.plot([d], [y], marker="x", markersize=10, mew=2.5, color=color, linestyle="none",
                    label=f"{label}: diverged at step {d}")
            # Beside the cross, on the side with room: an early divergence sits near the
            # left edge, and the last finite loss is usually the top of the axes.
            early = d < 0.6 * n_steps
            ax.annotate(f"non-finite at step {d}", (d, y), textcoords="offset points",
                        xytext=(8, 0) if early else (-8, 0), ha="left" if early else "right",
                        va="center", color=color, fontsize=8)
    ax.set_xlim(-0.02 * n_steps, 1.02 * (n_steps - 1))  # the whole run, even where every curve diverged early
    return _finish(fig, ax, "step", "loss" + (" (log scale)" if logy else ""), title, logy)


def gradient_flow(series: dict, layer_names=None, title: str = "Gradient norm per layer") -> Figure:
    """Per-layer gradient norms on a log scale; one series per framework or setting.

    Args:
        series: label -> sequence of per-layer norms (input side first).
        layer_names: tick labels, default 1..L.
    """
    fig, ax = _figure()
    n = 0
    for i, (label, norms) in enumerate(series.items()):
        norms = np.asarray(norms, dtype=float)
        n = max(n, len(norms))
        ax.plot(np.arange(1, len(norms) + 1), norms, marker="o", markersize=3, label=label, color=_color(label, i))
    if layer_names is not None:
        ax.set_xticks(np.arange(1, len(layer_names) + 1), labels=list(layer_names), rotation=90, fontsize=7)
    return _finish(fig, ax, "layer (input side first)", "gradient norm (log scale)", title, logy=True)


def curves(x, series: dict, xlabel: str, ylabel: str, title: str, logx: bool = False, logy: bool = True,
           reference: float | None = None) -> Figure:
    """One line per series against a shared ``x`` (depth, width, strength...), log y by default.

    Args:
        x: the shared x values.
        series: label -> y values (non-finite points are left out of a line).
        reference: draw a dotted horizontal line there (for example 1: no growth).

    Example:
        >>> fig = curves([2, 4, 8], {"plain": [1, 1, 1], "residual": [2, 4, 16]},
        ...              "depth", "gradient norm", "Gradient norm vs depth", logx=True)
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['plain', 'residual']
    """
    fig, ax = _figure()
    x = np.asarray(x, dtype=float)
    for i, (label, ys) in enumerate(series.items()):
        ys = np.asarray(ys, dtype=float)
        if ys.shape != x.shape:
            raise ValueError(f"series {label!r} must hold one value per x, shape {x.shape}; got shape {ys.shape}")
        ok = np.isfinite(ys)
        ax.plot(x[ok], ys[ok], marker="o", markersize=3, label=label, color=_color(label, i))
    if reference is not None:
        ax.axhline(reference, color=PALETTE["threshold"], ls=":", lw=1)
    if logx:
        if np.any(x <= 0):
            raise ValueError(f"logx needs positive x values, got {x.tolist()}")
        ax.set_xscale("log")
        ax.set_xticks(x, labels=[f"{v:g}" for v in x])  # the grid itself, not powers of ten
        ax.minorticks_off()
    return _finish(fig, ax, xlabel, ylabel, title, logy=logy)


def norm_history(norms, threshold=None, clipped=None, skipped=None, title: str = "Global gradient norm") -> Figure:
    """Global norm per step with the clip threshold, clipped and skipped steps marked.

    Args:
        norms: the norm at each step (before clipping).
        threshold: a number or a per-step sequence (adaptive policies).
        clipped: boolean per step, or indices of clipped steps.
        skipped: indices (or booleans) of skipped / spike steps.
    """
    fig, ax = _figure()
    norms = np.asarray(norms, dtype=float)
    steps = np.arange(len(norms))
    finite = np.isfinite(norms)
    ax.plot(steps[finite], norms[finite], color=PALETTE["unclipped"], label="norm before clipping", lw=1)
    if threshold is not None:
        thr = np.broadcast_to(np.asarray(threshold, dtype=float), norms.shape)
        ax.plot(steps, np.where(np.isfinite(thr), thr, np.nan), color=PALETTE["threshold"], ls="--",
                label="clip threshold")

    def _idx(mask):
        mask = np.asarray(mask)
        return np.flatnonzero(mask) if mask.dtype == bool else mask.astype(int)

    if clipped is not None and len(_idx(clipped)):
        i = _idx(clipped)
        ax.scatter(i, norms[i], color=PALETTE["clipped"], s=14, zorder=3, label="clipped step")
    if skipped is not None and len(_idx(skipped)):
        i = _idx(skipped)
        y = np.where(np.isfinite(norms[i]), norms[i], np.nanmax(norms[finite]) if finite.any() else 1.0)
        ax.scatter(i, y, color=PALETTE["spike"], marker="v", s=30, zorder=4, label="skipped step")
    return _finish(fig, ax, "step", "global gradient norm (log scale)", title, logy=True)


def lr_range_curve(lrs, losses, suggested_lr=None, title: str = "Learning-rate range test",
                   boundary=None) -> Figure:
    """Smoothed loss against learning rate (log x) with the suggested rate marked.

    ``boundary``: a stability boundary to mark as well, e.g. ``2 / lambda_max``.
    """
    fig, ax = _figure()
    ax.plot(lrs, losses, color=PALETTE["torch"], label="smoothed loss")
    if suggested_lr is not None:
        ax.axvline(suggested_lr, color=PALETTE["threshold"], ls="--", label=f"suggested lr = {suggested_lr:.2g}")
    if boundary is not None:
        ax.axvline(boundary, color=PALETTE["boundary"], ls=":", lw=2, label=f"2/λmax = {boundary:.2g}")
    ax.set_xscale("log")
    return _finish(fig, ax, "learning rate (log scale)", "loss", title)


def lr_schedules(rates: dict, title: str = "Learning-rate schedules") -> Figure:
    """Learning rate against step, one line per schedule (label -> rates), linear axes."""
    fig, ax = _figure()
    for i, (label, values) in enumerate(rates.items()):
        ax.plot(np.arange(len(values)), np.asarray(values, dtype=float), label=label, color=_color(label, i))
    return _finish(fig, ax, "step", "learning rate", title)


def quadratic_trajectory(A, trajectory, lr: float, title: str | None = None) -> Figure:
    """GD iterates on the contours of ``x^T A x / 2`` (2-D), titled with lr against 2/lambda_max."""
    A = np.asarray(A, dtype=float)
    traj = np.asarray(trajectory, dtype=float)
    lam_max = float(np.linalg.eigvalsh(A).max())
    fig, ax = _figure(figsize=(5.0, 4.2))
    finite = np.all(np.isfinite(traj), axis=1)
    shown = traj[finite]
    r = max(1.0, float(np.abs(traj[0]).max()) * 1.5)
    g = np.linspace(-r, r, 121)
    X, Y = np.meshgrid(g, g)
    Z = 0.5 * (A[0, 0] * X**2 + 2 * A[0, 1] * X * Y + A[1, 1] * Y**2)
    ax.contour(X, Y, Z, levels=12, colors="#BBBBBB", linewidths=0.7)
    ax.plot(shown[:, 0], shown[:, 1], marker="o", markersize=3, color=PALETTE["torch"], lw=1, label="GD iterates")
    ax.plot([0], [0], marker="*", color="black", markersize=10, linestyle="none", label="minimum")
    ax.set_xlim(-r, r)
    ax.set_ylim(-r, r)
    verdict = "converges" if lr < 2 / lam_max else "diverges"
    return _finish(fig, ax, "$x_1$", "$x_2$", title or f"lr = {lr:.3g}, 2/λmax = {2 / lam_max:.3g}: {verdict}",
                   legend={"loc": "upper right"})


def update_ratios(ratios: dict, title: str = "Update-to-weight ratio per layer") -> Figure:
    """``||Δw|| / ||w||`` per step for each layer (label -> sequence), log scale, 1e-3 guide."""
    fig, ax = _figure()
    for i, (label, values) in enumerate(ratios.items()):
        ax.plot(np.asarray(values, dtype=float), label=label, color=_CYCLE[i % len(_CYCLE)], lw=1)
    ax.axhline(1e-3, color=PALETTE["threshold"], ls=":", label="1e-3 rule of thumb")
    return _finish(fig, ax, "step", "update / weight norm (log scale)", title, logy=True,
                   legend={"fontsize": 7, "ncol": 2})


def sharpness_curve(steps, sharpness, lr: float, title: str = "Sharpness during full-batch gradient descent") -> Figure:
    """Top Hessian eigenvalue against step, with the ``2 / lr`` stability line."""
    fig, ax = _figure()
    ax.plot(steps, sharpness, marker="o", markersize=3, color=PALETTE["torch"], label="sharpness λmax (PyTorch)")
    ax.axhline(2.0 / lr, color=PALETTE["threshold"], ls="--", label=f"2 / lr = {2.0 / lr:.3g}")
    return _finish(fig, ax, "step", "top Hessian eigenvalue", title)


def gradient_through_time(series: dict, title: str = "Gradient reaching each time step") -> Figure:
    """``||dL/dx_t||`` against time step t, one line per setting (e.g. spectral radius), log scale."""
    fig, ax = _figure()
    for i, (label, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        ax.plot(np.arange(len(values)), values, label=label, color=_color(label, i), lw=1.5)
    return _finish(fig, ax, "time step t (the loss is read at the last step)", "||dL/dx_t|| (log scale)", title,
                   logy=True)


def loss_surface(W, B, loss, point=None, step=None, title: str = "Loss surface") -> Figure:
    """Filled contours of ``log10(loss)`` over a (w, b) grid, with an optional point and step arrow."""
    fig, ax = _figure(figsize=(5.6, 4.2))
    with np.errstate(divide="ignore"):
        z = np.log10(np.maximum(np.asarray(loss, dtype=float), 1e-12))
    cs = ax.contourf(W, B, z, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="log10 loss")
    if point is not None:
        ax.plot([point[0]], [point[1]], marker="o", color="white", markersize=6, linestyle="none", label="start")
        if step is not None:
            # Shorten the arrow to the frame, keeping its direction (an annotation whose end
            # lies outside the axes is not drawn at all).
            lo, hi = np.array([np.min(W), np.min(B)]), np.array([np.max(W), np.max(B)])
            p0, d = np.asarray(point, dtype=float), np.asarray(step, dtype=float)
            t = 1.0
            for k in range(2):
                if d[k] > 0:
                    t = min(t, (hi[k] - p0[k]) / d[k])
                elif d[k] < 0:
                    t = min(t, (lo[k] - p0[k]) / d[k])
            end = p0 + 0.98 * t * d
            ax.annotate("", xy=tuple(end), xytext=tuple(p0),
                        arrowprops={"arrowstyle": "->", "color": PALETTE["unclipped"], "lw": 2})
            label = "one gradient step" + (f" (x{1 / t:.2g} longer than shown)" if t < 1 else "")
            ax.plot([], [], color=PALETTE["unclipped"], label=label)
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(np.min(W), np.max(W))
    ax.set_ylim(np.min(B), np.max(B))
    ax.set_xlabel("recurrent weight w")
    ax.set_ylabel("bias b")
    ax.set_title(title)
    return fig


#: Colours of :data:`gradtools.spikes.OUTCOMES`, best to worst.
OUTCOME_COLORS = {"unharmed": "#2CA02C", "recovered": "#BCBD22", "slowed": "#FF7F0E", "diverged": "#D62728"}


def defence_matrix(records, title: str = "Spike defences", value: str = "final_rel", panels: str | None = None,
                   figsize=None) -> Figure:
    """Defence (rows) x scenario (columns), each cell coloured by its outcome and labelled with ``value``.

    ``records`` is what ``compare_defences`` returns (a DataFrame or a list of dicts), or
    rows read back from its CSV; ``panels`` names a column (e.g. ``"framework"``) to draw
    one panel per value of it, side by side. Defences and scenarios keep their order of
    first appearance.
    """
    rows = records.to_dict("records") if hasattr(records, "to_dict") else [dict(r) for r in records]
    if not rows:
        raise ValueError("records is empty: nothing to draw")
    for key in ("defence", "scenario", "outcome"):
        if key not in rows[0]:
            raise ValueError(f"records need a {key!r} field, got {sorted(rows[0])}")
    groups = list(dict.fromkeys(r[panels] for r in rows)) if panels else [None]
    defences = list(dict.fromkeys(r["defence"] for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    width = 1.2 + 0.85 * len(scenarios) * len(groups)
    fig = Figure(figsize=figsize or (max(6.4, width), 0.5 + 0.32 * len(defences)), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    colours = {k: i for i, k in enumerate(OUTCOME_COLORS)}
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(list(OUTCOME_COLORS.values()))
    for ax, group in zip(axes, groups):
        grid = np.full((len(defences), len(scenarios)), np.nan)
        for r in rows:
            if panels and r[panels] != group:
                continue
            i, j = defences.index(r["defence"]), scenarios.index(r["scenario"])
            grid[i, j] = colours[r["outcome"]]
            v = r.get(value)
            if v is not None and np.isfinite(float(v)):
                ax.text(j, i, f"{float(v):.2f}", ha="center", va="center", fontsize=7)
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(OUTCOME_COLORS) - 0.5, aspect="auto")
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(defences)), defences, fontsize=8)
        if group is not None:
            ax.set_title(str(group), fontsize=9)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=c, label=k) for k, c in OUTCOME_COLORS.items()], loc="outside lower center",
               ncols=len(OUTCOME_COLORS), fontsize=8)
    fig.suptitle(title)
    return fig
