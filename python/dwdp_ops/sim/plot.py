"""Figures of a simulation (matplotlib, imported only here and only when a figure is asked for).

``plot(result, path, sweep_rows)``: left, the per-category iteration time of DWDP and DEP as stacked bars (the
paper's Table 3 as a picture; the overlapped copy as a hatched bar beside DWDP); right, over the request-length CV:
DEP's synchronisation share and the DWDP / DEP TPS/GPU ratio (``sweep_rows`` from ``analysis.sweep``).
"""

from __future__ import annotations

import os

from .costs import CATEGORIES

__all__ = ["MISSING", "have_matplotlib", "plot", "plot_format"]

MISSING = "--plot needs matplotlib, which is not installed (pip install matplotlib, or the package's 'bench' extra)"
COLORS = {"attention": "#4c72b0", "expert_gemm": "#dd8452", "dense_gemm": "#55a868", "others": "#8c8c8c",
          "communication": "#c44e52", "sync_wait": "#8172b3", "exposed_fetch": "#da8bc3"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_format(path: str) -> str:
    """The format ``plot`` writes ``path`` in: its extension (any case), PNG without one (written at ``path`` itself,
    not ``path``.png as matplotlib would); ValueError naming the formats for an extension matplotlib cannot write.
    Needs matplotlib."""
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        return "png"
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if ext not in formats:
        raise ValueError(f"cannot write a .{ext} figure (formats: {', '.join(sorted(formats))}; no extension: png)")
    return ext


def plot(result: dict, path: str, sweep_rows: list[dict] | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(MISSING) from None
    c = result["config"]
    fig, axes = plt.subplots(1, 2 if sweep_rows else 1, figsize=(12 if sweep_rows else 6.5, 4.6), squeeze=False)
    ax = axes[0][0]
    labelled: set[str] = set()
    for x, mode in enumerate((result["dwdp"], result["dep"])):
        bottom = 0.0
        for cat in CATEGORIES:
            v = mode["breakdown_ms"][cat]
            if v > 0:
                ax.bar(x, v, bottom=bottom, color=COLORS[cat], label=None if cat in labelled else cat)
                labelled.add(cat)
                bottom += v
    copy = result["dwdp"]["overlapped_copy_ms"]
    if copy > 0:
        ax.bar(-0.45, copy, width=0.12, color="white", edgecolor="#da8bc3", hatch="//", label="overlapped copy")
    ax.set_xticks([0, 1], [f"DWDP\n{result['dwdp']['tps_per_gpu']:.0f} tok/s/GPU",
                           f"DEP\n{result['dep']['tps_per_gpu']:.0f} tok/s/GPU"])
    ax.set_ylabel("ms per iteration")
    src = f"cv {c['cv']}" if c.get("cv") is not None else f"ratio {c['ratio']}"
    ax.set_title(f"{c['gpus']} x {c['calibration']}, ISL {c['isl']} ({src}), {c['max_tokens']} tokens, "
                 f"{c['layers']} layers" + (f", what-if {c['overrides']}" if c["overrides"] else "")
                 + f"\nDWDP / DEP TPS/GPU = {result['ratio']:.3f}", fontsize=8)
    ax.set_xlim(-0.7, 2.6)
    ax.legend(fontsize=7, loc="upper right")
    if sweep_rows:
        ax2 = axes[0][1]
        for budget in sorted({r["max_tokens"] for r in sweep_rows}):
            pts = sorted((r["cv"], r) for r in sweep_rows if r["max_tokens"] == budget and "cv" in r)
            cvs = [100 * p[0] for p in pts]
            ax2.plot(cvs, [100 * p[1]["dep"]["sync_share"] for p in pts], "o-", label=f"DEP sync wait, {budget}")
            ax2.plot(cvs, [100 * (p[1]["ratio"] - 1) for p in pts], "s--", label=f"DWDP / DEP - 1, {budget}")
        ax2.set_xlabel("request-length CV (%)")
        ax2.set_ylabel("%")
        ax2.axhline(0, color="black", lw=0.5)
        ax2.set_title("DEP synchronisation share and DWDP's TPS/GPU gain against CV", fontsize=9)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=plot_format(path))
    plt.close(fig)
