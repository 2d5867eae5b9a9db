"""Every plot renders headless with the right content; sliders work live and static."""

import math
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from gradtools import plots
from gradtools.widgets import MAX_STATIC_BYTES, slider


def _lines(ax):
    return [l for l in ax.get_lines() if l.get_label() and not l.get_label().startswith("_")]


def test_loss_curves_marks_divergence():
    fig = plots.loss_curves({"PyTorch": [1.0, 0.5, 0.4], "Keras": [1.0, 10.0, math.inf, math.nan]})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "step" and ax.get_ylabel().startswith("loss") and ax.get_yscale() == "log"
    labels = [l.get_label() for l in _lines(ax)]
    assert labels == ["PyTorch", "Keras", "Keras: diverged at step 2"]
    marker = _lines(ax)[2]
    assert marker.get_marker() == "x" and list(marker.get_xdata()) == [2]
    assert any("non-finite at step 2" in t.get_text() for t in ax.texts)
    # one palette: framework colours are fixed
    assert _lines(ax)[0].get_color() == plots.PALETTE["torch"] and _lines(ax)[1].get_color() == plots.PALETTE["keras"]


def test_loss_curves_label_stays_inside_and_styles_may_recolour():
    fig = plots.loss_curves({"early": [1.0, 5.0, math.nan] + [1.0] * 37, "late": [1.0] * 39 + [math.inf]},
                            styles={"late": {"color": "#123456", "ls": "--"}})
    ax = fig.axes[0]
    early, late = ax.texts
    assert early.get_ha() == "left" and late.get_ha() == "right"  # the label reads towards the middle
    fig.canvas.draw()
    box, frame = early.get_window_extent(), ax.get_window_extent()
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1
    line = [l for l in _lines(ax) if l.get_label() == "late"][0]
    assert line.get_color() == "#123456" and line.get_linestyle() == "--"


def test_loss_curves_without_divergence_has_no_marker():
    ax = plots.loss_curves({"clipped": [1.0, 0.5]}).axes[0]
    assert [l.get_label() for l in _lines(ax)] == ["clipped"] and not ax.texts
    assert _lines(ax)[0].get_color() == plots.PALETTE["clipped"]


def test_gradient_flow():
    ax = plots.gradient_flow({"PyTorch": [1e-3, 1e-1, 10.0], "Keras": [1e-3, 1e-1, 10.0]},
                             layer_names=["a", "b", "c"]).axes[0]
    assert ax.get_yscale() == "log" and len(_lines(ax)) == 2
    assert "layer" in ax.get_xlabel() and "norm" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_norm_history_threshold_clipped_skipped():
    norms = [1.0, 5.0, 1.2, math.nan, 0.9]
    ax = plots.norm_history(norms, threshold=2.0, clipped=[False, True, False, False, False], skipped=[3]).axes[0]
    labels = [l.get_label() for l in _lines(ax)]
    assert labels == ["norm before clipping", "clip threshold"]
    assert list(_lines(ax)[1].get_ydata()) == [2.0] * 5
    collections = {c.get_label(): c for c in ax.collections}
    assert set(collections) == {"clipped step", "skipped step"}
    assert collections["clipped step"].get_offsets().tolist() == [[1.0, 5.0]]


def test_lr_range_and_quadratic_and_ratios():
    ax = plots.lr_range_curve([1e-4, 1e-3, 1e-2], [1.0, 0.5, 3.0], suggested_lr=1e-3).axes[0]
    assert ax.get_xscale() == "log" and any("suggested lr = 0.001" in l.get_label() for l in ax.get_lines())
    A = np.diag([1.0, 4.0])
    from gradtools.maths import gd_quadratic

    fig = plots.quadratic_trajectory(A, gd_quadratic(A, [1.0, 1.0], lr=0.6, steps=5), lr=0.6)
    assert fig.axes[0].get_title() == "lr = 0.6, 2/λmax = 0.5: diverges"
    ax = plots.update_ratios({"0.weight": [1e-3, 2e-3], "0.bias": [1e-4, 1e-4]}).axes[0]
    assert len(_lines(ax)) == 3 and ax.get_yscale() == "log"


def test_chapter_figures():
    ax = plots.sharpness_curve([0, 10, 20], [5.0, 12.0, 19.8], lr=0.1).axes[0]
    assert [l.get_label() for l in _lines(ax)] == ["sharpness λmax (PyTorch)", "2 / lr = 20"]
    ax = plots.gradient_through_time({"ρ = 0.9": [1e-5, 1e-2, 1.0], "ρ = 1.1": [10.0, 3.0, 1.0]}).axes[0]
    assert len(_lines(ax)) == 2 and ax.get_yscale() == "log" and "time step" in ax.get_xlabel()
    W, B = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 4))
    fig = plots.loss_surface(W, B, W + B + 0.1, point=(0.5, 0.5), step=(0.2, 0.0))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "recurrent weight w" and len(fig.axes) == 2  # the colour bar
    assert [l.get_label() for l in _lines(ax)] == ["start", "one gradient step"]
    ax = plots.loss_surface(W, B, W + B + 0.1, point=(0.5, 0.5), step=(100.0, 0.0)).axes[0]
    assert _lines(ax)[1].get_label() == "one gradient step (x2e+02 longer than shown)"
    (arrow,) = ax.texts
    assert arrow.xy[0] <= 1.0  # inside the frame, so it is drawn


def _fn(lr):
    fig = plots.loss_curves({"run": [1.0, 1.0 / (1 + lr)]}, title=f"lr={lr}")
    return fig, {"final": round(1 / (1 + lr), 3)}


def test_static_slider_is_self_contained_and_complete():
    html = slider(_fn, lr=[0.1, 1.0, 10.0], title="demo").static_html()
    assert len(html) < MAX_STATIC_BYTES
    assert html.count('class="gts-frame"') == 3 and html.count("data:image/png;base64,") == 3
    assert 'type="range"' in html and 'aria-label="lr"' in html
    assert not re.search(r"<script[^>]+src=", html) and "http" not in html  # nothing external
    assert "<table>" in html and "<td>0.909</td>" in html  # text fallback
    assert len(re.findall(r'class="gts-frame"[^>]*hidden', html)) == 2  # one frame shown


def test_static_slider_two_knobs_and_budget():
    s = slider(lambda a, b: f"{a}+{b}", a=[1, 2], b=[10, 20, 30])
    html = s.static_html()
    assert html.count('class="gts-frame"') == 6 and html.count('type="range"') == 2
    with pytest.raises(ValueError, match="over the 1500000 budget"):
        slider(_fn, lr=list(range(1, 13)), dpi=400).static_html()


def test_slider_bad_input():
    with pytest.raises(ValueError, match="one or two knobs"):
        slider(_fn)
    with pytest.raises(ValueError, match="lr must be a list of at least two grid values"):
        slider(_fn, lr=[0.1])
    with pytest.raises(TypeError, match="fn must be callable"):
        slider(3, lr=[0.1, 1.0])


def test_live_widget_recomputes_off_grid_in_a_kernel():
    """Drive the ipywidgets slider programmatically in a real kernel and read its output."""
    import nbformat
    from nbclient import NotebookClient

    cells = [
        "from gradtools.widgets import slider\n"
        "calls = []\n"
        "def fn(lr):\n"
        "    calls.append(lr)\n"
        "    return f'loss at lr={lr:.4f}'\n"
        "s = slider(fn, lr=[0.01, 0.1, 1.0])\n"
        "s",
        "w = s.widget(); (c,) = w.controls\n"
        "before = [o['text'] for o in w.output.outputs]\n"
        "c.value = 0.0437  # not a grid value\n"
        "after = [o['text'] for o in w.output.outputs]\n"
        "print(type(c).__name__, before, after, [round(v, 4) for v in calls])",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    bundle = nb.cells[0].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in bundle and "text/html" in bundle  # both views
    text = nb.cells[1].outputs[0]["text"]
    assert text.startswith("FloatLogSlider")  # a geometric grid gets a log slider
    assert "FloatLogSlider ['loss at lr=0.1000\\n'] ['loss at lr=0.0437\\n']" in text  # the output changed
    assert "0.0437]" in text  # fn was called with the off-grid value


def test_string_knob_is_a_switch():
    """A grid of strings (an architecture, say) is a stepped slider in the book and a drop-down in a kernel."""
    s = slider(lambda arch, depth: f"{arch} at depth {depth}", arch=["plain", "residual"], depth=[4, 16])
    html = s.static_html()
    assert html.count('class="gts-frame"') == 4 and "&quot;residual&quot;" in html
    assert "<pre>residual at depth 16</pre>" in html
    w = s.widget()
    switch, knob = w.controls
    assert type(switch).__name__ == "Dropdown" and [v for _, v in switch.options] == ["plain", "residual"]
    switch.value = "plain"
    knob.value = 9  # off the grid
    assert w.output.outputs[0]["text"] == "plain at depth 9\n"


def test_switch_of_none_and_strings():
    """``norm=[None, "batch", "layer"]`` is a natural grid: None is a choice too."""
    s = slider(lambda norm: f"norm {norm}", norm=[None, "batch", "layer"])
    assert s.static_html().count('class="gts-frame"') == 3
    (switch,) = s.widget().controls
    assert list(switch.options) == [("None", None), ("batch", "batch"), ("layer", "layer")]
    switch.value = None
    assert s.widget().output.outputs[0]["text"] == "norm None\n"
    with pytest.raises(ValueError, match="curves|one value per x"):
        plots.curves([1, 2], {"a": [[1, 2], [3, 4]]}, "x", "y", "t")


def test_curves_log_x_ticks_are_the_grid():
    fig = plots.curves([3, 6, 12, 24], {"a": [1, 2, 3, 4]}, "x", "y", "t", logx=True)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["3", "6", "12", "24"]
    with pytest.raises(ValueError, match="logx needs positive x"):
        plots.curves([0, 1], {"a": [1, 2]}, "x", "y", "t", logx=True)
