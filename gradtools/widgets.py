"""Sliders that recompute live in a kernel and still move in the static HTML book.

:func:`slider` takes a function of one or two knobs and a grid of values for
each. Displayed, it is one output carrying two representations:

* ``application/vnd.jupyter.widget-view+json``: ipywidgets sliders that call the
  function on every move, for any value in the knob's range, not only grid values
  (JupyterLab, Colab, VS Code);
* ``text/html``: a self-contained static slider over the precomputed grid (PNG
  frames inlined as data URIs, a few lines of inline JavaScript, no external
  script), keyboard-operable, with a table of each grid point's key figures as a
  text fallback. The book's ``_config.yml`` tells the builder to ignore the widget
  representation, so readers of the HTML book get this working slider rather than
  a dead widget.

Example:
    >>> from gradtools.widgets import slider
    >>> s = slider(lambda lr: f"lr={lr}", lr=[0.1, 1.0])
    >>> "lr=0.1" in s.static_html()
    True
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import uuid

import numpy as np

__all__ = ["slider", "Slider", "MAX_STATIC_BYTES"]

#: Budget for one static slider's HTML.
MAX_STATIC_BYTES = 1_500_000


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _is_switch(values) -> bool:
    """A grid of choices rather than numbers: strings, None (``norm=[None, "batch"]``), booleans."""
    return any(v is None or isinstance(v, (str, bool)) for v in values)


def _is_geometric(values) -> bool:
    v = np.asarray(values, dtype=float)
    if len(v) < 3 or np.any(v <= 0):
        return False
    r = v[1:] / v[:-1]
    return bool(np.allclose(r, r[0], rtol=1e-6) and r[0] > 1.5)


def _split(result):
    """(figure or None, text or None, summary dict)."""
    from matplotlib.figure import Figure

    summary = {}
    if isinstance(result, tuple):
        result, summary = result
    if isinstance(result, Figure):
        return result, None, dict(summary)
    return None, str(result), dict(summary)


def _png(fig, dpi: int) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Slider:
    """A live/static slider over ``fn``. Build it with :func:`slider`."""

    def __init__(self, fn, knobs: dict, dpi: int = 72, title: str | None = None):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not 1 <= len(knobs) <= 2:
            raise ValueError(f"slider takes one or two knobs, got {len(knobs)}: {list(knobs)}")
        for name, values in knobs.items():
            if not isinstance(values, (list, tuple, np.ndarray)) or len(values) < 2:
                raise ValueError(f"{name} must be a list of at least two grid values, got {values!r}")
            if _is_switch(values):
                continue
            if any(not math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} must hold finite numbers, or be a switch (strings, None), got {values!r}")
        self.fn = fn
        self.knobs = {k: list(v) for k, v in knobs.items()}
        self.dpi = dpi
        self.title = title
        self._frames = None
        self._widget = None

    # ---------------------------------------------------------------- static
    def frames(self):
        """Evaluate ``fn`` on the whole grid once: list of (values, figure-png, text, summary)."""
        if self._frames is None:
            frames = []
            names = list(self.knobs)
            for combo in itertools.product(*self.knobs.values()):
                fig, text, summary = _split(self.fn(**dict(zip(names, combo))))
                frames.append((combo, _png(fig, self.dpi) if fig is not None else None, text, summary))
            self._frames = frames
        return self._frames

    def static_html(self) -> str:
        frames = self.frames()
        names = list(self.knobs)
        sid = "gts-" + uuid.uuid5(uuid.NAMESPACE_OID, repr((names, self.knobs, self.title))).hex[:10]
        start = [len(v) // 2 for v in self.knobs.values()]
        parts = [f'<div class="gradtools-slider" id="{sid}" data-knobs="{html.escape(json.dumps(names))}">']
        if self.title:
            parts.append(f"<p><strong>{html.escape(self.title)}</strong></p>")
        for k, (name, values) in enumerate(self.knobs.items()):
            labels = html.escape(json.dumps([_fmt(v) for v in values]))
            parts.append(
                f'<label>{html.escape(name)} = <output id="{sid}-v{k}">{_fmt(values[start[k]])}</output><br>'
                f'<input type="range" id="{sid}-k{k}" min="0" max="{len(values) - 1}" step="1" value="{start[k]}" '
                f'data-labels="{labels}" aria-label="{html.escape(name)}" style="width: 20em"></label><br>'
            )
        for i, (combo, png, text, summary) in enumerate(frames):
            idx = [self.knobs[n].index(v) for n, v in zip(names, combo)]
            hidden = "" if idx == start else " hidden"
            alt = ", ".join(f"{n} = {_fmt(v)}" for n, v in zip(names, combo))
            caption = "; ".join(f"{k}: {_fmt(v)}" for k, v in summary.items())
            parts.append(f'<div class="gts-frame" data-idx="{",".join(map(str, idx))}"{hidden}>')
            if png is not None:
                parts.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}" style="max-width:100%">')
            if text is not None:
                parts.append(f"<pre>{html.escape(text)}</pre>")
            if caption:
                parts.append(f'<p class="gts-caption">{html.escape(alt)}: {html.escape(caption)}</p>')
            parts.append("</div>")
        # Text fallback: the key figures of every grid point.
        keys = sorted({k for *_, s in frames for k in s})
        if keys:
            parts.append("<details><summary>All grid values as a table</summary><table><thead><tr>")
            parts.extend(f"<th>{html.escape(h)}</th>" for h in [*names, *keys])
            parts.append("</tr></thead><tbody>")
            for combo, _, _, summary in frames:
                cells = [_fmt(v) for v in combo] + [_fmt(summary.get(k, "")) for k in keys]
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            parts.append("</tbody></table></details>")
        parts.append(
            "<script>(function(){var r=document.getElementById(%s);if(!r)return;"
            "var ins=r.querySelectorAll('input[type=range]');"
            "function upd(){var idx=[];ins.forEach(function(x,k){idx.push(x.value);"
            "document.getElementById(%s+'-v'+k).textContent=JSON.parse(x.dataset.labels)[x.value];});"
            "var key=idx.join(',');r.querySelectorAll('.gts-frame').forEach(function(f){"
            "f.hidden=(f.dataset.idx!==key);});}"
            "ins.forEach(function(x){x.addEventListener('input',upd);});})();</script></div>"
            % (json.dumps(sid), json.dumps(sid))
        )
        out = "".join(parts)
        if len(out) > MAX_STATIC_BYTES:
            raise ValueError(
                f"the static slider is {len(out)} bytes, over the {MAX_STATIC_BYTES} budget: "
                f"use fewer grid values or a lower dpi (dpi={self.dpi})"
            )
        return out

    # ------------------------------------------------------------------ live
    def widget(self):
        """The ipywidgets version: sliders plus an output area that recomputes on every move."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as W
        controls = []
        for name, values in self.knobs.items():
            if _is_switch(values):  # the grid's values, in order, labelled as in the book
                controls.append(W.Dropdown(options=[(_fmt(v), v) for v in values], value=values[len(values) // 2],
                                           description=name))
                continue
            lo, hi = float(min(values)), float(max(values))
            mid = float(values[len(values) // 2])
            if _is_geometric(values):
                controls.append(W.FloatLogSlider(value=mid, base=10, min=math.log10(lo), max=math.log10(hi),
                                                 step=(math.log10(hi) - math.log10(lo)) / 200,
                                                 description=name, continuous_update=False, readout_format=".3g"))
            elif all(float(v).is_integer() for v in values):
                controls.append(W.IntSlider(value=int(mid), min=int(lo), max=int(hi), step=1, description=name,
                                            continuous_update=False))
            else:
                controls.append(W.FloatSlider(value=mid, min=lo, max=hi, step=(hi - lo) / 200, description=name,
                                              continuous_update=False, readout_format=".3g"))
        out = W.Output()

        def render(_=None):
            # Set the Output widget's outputs directly rather than capturing prints:
            # capture is routed by the frontend, this works in any frontend and in tests.
            kwargs = {c.description: c.value for c in controls}
            fig, text, summary = _split(self.fn(**kwargs))
            outputs = []
            if fig is not None:
                outputs.append({"output_type": "display_data", "metadata": {},
                                "data": {"image/png": _png(fig, self.dpi), "text/plain": repr(fig)}})
            lines = [t for t in (text, "; ".join(f"{k}: {_fmt(v)}" for k, v in summary.items())) if t]
            if lines:
                outputs.append({"output_type": "stream", "name": "stdout", "text": "\n".join(lines) + "\n"})
            out.outputs = tuple(outputs)

        for c in controls:
            c.observe(render, names="value")
        render()
        self._widget = W.VBox([*controls, out])
        self._widget.render = render  # for tests and programmatic use
        self._widget.controls = controls
        self._widget.output = out
        return self._widget

    def _repr_mimebundle_(self, include=None, exclude=None):
        desc = ", ".join(f"{n} over {len(v)} values" for n, v in self.knobs.items())
        bundle = {"text/plain": f"Slider({desc})", "text/html": self.static_html()}
        if _in_kernel():
            bundle.update({k: v for k, v in self.widget()._repr_mimebundle_().items() if k != "text/plain"})
        return bundle


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython

        ip = get_ipython()
    except ImportError:
        return False
    return ip is not None and getattr(ip, "kernel", None) is not None


def slider(fn, *, dpi: int = 72, title: str | None = None, **knobs) -> Slider:
    """A slider over ``fn``'s keyword arguments; each knob is given as a grid of values.

    Args:
        fn (callable): ``fn(**knobs)`` returns a matplotlib Figure, a string, or
            ``(figure_or_string, summary_dict)``; the summary's key figures go into the
            static slider's caption and its text table.
        dpi (int): resolution of the static frames, default 72.
        title (str): shown above the static slider.
        **knobs: one or two ``name=[values...]`` grids. The live slider spans the
            grid's range continuously (log scale for geometric grids); a grid of
            strings, None or booleans is a switch (a drop-down in a kernel, a
            stepped slider in the book).

    Returns:
        A :class:`Slider`; display it (make it a cell's last expression).
    """
    return Slider(fn, knobs, dpi=dpi, title=title)
