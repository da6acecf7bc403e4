"""Renders bench/results/fetch_bandwidth_*.json into a PNG plot and the markdown tables of docs/benchmarks.md.

    python bench/render.py            # rewrites the generated section of docs/benchmarks.md and the PNGs
    python bench/render.py --help     # this text

Every figure is the slowest rank's median (``gbps_min``; the mean over ranks in brackets), as a fraction of the
same run's raw cudaMemcpyPeerAsync baseline (1 GiB, one peer per reader; where a record carries its own baseline,
timed interleaved with its group, the fraction is ``of_baseline_min``: the lowest rank's median of per-repeat
ratios) and of the physical NVLink rate (links x per-link rate from ``nvidia-smi nvlink -s``; where a record has no
NVLink rate, 0 links or no ``nvlink`` at all, the text says so and the fractions of it are left out).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- fetch_bandwidth:begin -->", "<!-- fetch_bandwidth:end -->"
GiB = 1 << 30


def load() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob("fetch_bandwidth_*.json"))]


def baseline(data: dict, fallback: tuple[str, float] | None) -> tuple[float, str]:
    per = [r["baseline"]["gbps_min"] for r in data["records"] if "baseline" in r]
    if per and len(per) == len(data["records"]):  # every record carries its own interleaved baseline
        return min(per), (f"per row: measured interleaved with the row's group in the same run, {min(per):.1f}-"
                          f"{max(per):.1f} GB/s slowest rank over the groups")
    for r in data["records"]:
        if r["case"] == "size_sweep" and r["mode"] == "raw_peer" and r["bytes"] == GiB:
            return r["gbps_min"], "same run"
    if fallback:
        return fallback[1], f"from {fallback[0]} (same machine, measured in the same batch)"
    raise SystemExit("no raw baseline")


def link_rate(data: dict) -> float | None:
    """GB/s per direction, or None without NVLink (``nvlink_facts``: 0 links and no per-link rate, e.g. PCIe only or
    no nvidia-smi) or without ``nvlink`` in the record (older files)."""
    nv = data.get("nvlink") or {}
    return nv["links"] * nv["gbps_per_link"] if nv.get("links") and nv.get("gbps_per_link") else None


def link_text(data: dict, link: float | None) -> str:
    nv = data.get("nvlink")
    if link is not None:
        return f"NVLink {nv['links']} links x {nv['gbps_per_link']} GB/s = {link:.0f} GB/s per direction"
    if nv is None:
        return "NVLink not recorded, link rate unknown"
    if nv.get("links"):  # links counted, but no (or a zero) per-link rate recorded
        return f"NVLink {nv['links']} links, per-link rate not recorded: link rate unknown"
    return f"no NVLink ({nv.get('links', 0)} links in `nvidia-smi nvlink -s`), link rate unknown"


def fmt(r: dict, base: float, link: float | None) -> str:
    of_base = r.get("of_baseline_min", r["gbps_min"] / base)  # per-row baseline where the record carries one
    return (f"| {r['mode']} | {r['bytes'] / (1 << 20):.0f} MiB | {r['gbps_min']:.1f} ({r['gbps_mean']:.1f}) | "
            f"{of_base:.1%} | {'-' if link is None else format(r['gbps_min'] / link, '.1%')} |")


def tables(files: list[tuple[str, dict]]) -> str:
    main = next(((n, d) for n, d in files if any(r["case"] == "size_sweep" for r in d["records"])), None)
    fallback = (main[0], baseline(main[1], None)[0]) if main else None
    out = []
    for name, d in files:
        base, where = baseline(d, fallback)
        link = link_rate(d)
        out.append(f"### `{name}`\n")
        out.append(f"{d['card']}, driver {d['driver']}, CUDA runtime {d['cuda_runtime']}, {d['world_size']} ranks, "
                   f"{d['date']}, `{d['command']}` (launched by `python -m dwdp_ops.launch -n {d['world_size']}`); "
                   f"{link_text(d, link)}; baseline raw peer copy {base:.1f} GB/s ({where}); medians of "
                   f"{d['repeats']} repeats.\n")
        cases = []
        for r in d["records"]:
            if r["case"] not in cases:
                cases.append(r["case"])
        for case in cases:
            rows = [r for r in d["records"] if r["case"] == case]
            pattern = rows[0]["pattern"]
            out.append(f"**{case}** ({'pattern per row' if case == 'pattern' else pattern})\n")
            out.append("| mode | bytes per reader | GB/s slowest rank (mean) | of raw peer copy | of NVLink |")
            out.append("| --- | --- | --- | --- | --- |")
            for r in rows:
                line = fmt(r, base, link)
                if case == "pattern":
                    line = line.replace(f"| {r['mode']} |", f"| {r['mode']} ({r['pattern']}) |", 1)
                out.append(line)
            out.append("")
    return "\n".join(out)


def plot(files: list[tuple[str, dict]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, d in files:
        sweep = [r for r in d["records"] if r["case"] == "size_sweep"]
        layers = [r for r in d["records"] if r["case"].startswith("dwdp_layer")]
        panels = (1 if sweep else 0) + (1 if layers else 0)
        if not panels:
            continue
        fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
        link = link_rate(d)
        unknown = "" if link else " (no NVLink rate)"
        ax_i = 0
        if sweep:
            ax = axes[0][ax_i]
            ax_i += 1
            for mode in dict.fromkeys(r["mode"] for r in sweep):
                rs = [r for r in sweep if r["mode"] == mode]
                ax.plot([r["bytes"] / (1 << 20) for r in rs], [r["gbps_min"] for r in rs], marker="o", label=mode)
            if link:
                ax.axhline(link, color="grey", ls="--", lw=1, label="NVLink physical")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes per transfer (MiB)")
            ax.set_ylabel("GB/s (slowest rank)")
            ax.set_title(f"one peer per reader, {d['card']}{unknown}")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        if layers:
            ax = axes[0][ax_i]
            cases = list(dict.fromkeys(r["case"] for r in layers))  # one per dtype of the job (--dtypes)
            # the modes of several cases share names: label them with the case, else their bars share one row
            labels = [r["mode"] if len(cases) == 1 else f"{r['mode']} ({r['case']})" for r in layers]
            ax.barh(labels[::-1], [r["gbps_min"] for r in layers][::-1], color="tab:blue")
            if link:
                ax.axvline(link, color="grey", ls="--", lw=1)
            ax.set_xlabel("GB/s (slowest rank)")
            ax.set_title(f"{', '.join(cases)}: DeepSeek-R1 layer, N={d['world_size']}{unknown}")
            ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        png = RESULTS / name.replace(".json", ".png")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        made.append(png.name)
    return made


def plot_timelines() -> list[str]:
    """Gantt picture of one step per recorded token count: copy stream (prefetches) and compute stream (wait, GEMMs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for p in sorted(RESULTS.glob("prefetch_overlap_*.json")):
        d = json.loads(p.read_text())
        tls = d["ranks"][0].get("timelines") or []
        if not tls:
            continue
        fig, axes = plt.subplots(len(tls), 1, figsize=(11, 2.2 * len(tls)), squeeze=False)
        for ax, tl in zip(axes[:, 0], tls):
            for layer, start, end in tl["copy"]:
                ax.broken_barh([(start, end - start)], (10, 8), color="tab:orange")
                ax.text(start, 19, f"fetch {layer}", fontsize=7)
            for layer, a, b, c in tl["compute"]:
                if b - a > 0.05:
                    ax.broken_barh([(a, b - a)], (0, 8), color="tab:red")
                ax.broken_barh([(b, c - b)], (0, 8), color="tab:blue")
                ax.text(b, -4, f"MoE {layer}", fontsize=7)
            ax.set_yticks([4, 14], ["compute", "copy"])
            ax.set_ylim(-7, 24)
            ax.set_xlabel("ms since step start")
            ax.set_title(f"{d['card']}, rank 0 of {d['world_size']}, {tl['tokens']} tokens/rank "
                         "(red: compute waiting for its prefetch)", fontsize=9)
        fig.tight_layout()
        out = RESULTS / p.name.replace(".json", "_timeline.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        made.append(out.name)
    return made


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python bench/render.py", description=re.sub(r"``(.+?)``", r"\1", __doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    doc = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in doc or END not in doc:  # (checked before any PNG is rewritten)
        raise SystemExit(f"{DOC} has no generated section ({BEGIN} ... {END}): not rewritten")
    files = load()
    pngs = plot(files)
    timelines = plot_timelines()
    print(f"timelines: {timelines}")
    body = tables(files) + "\n" + "\n".join(f"![{p}](../bench/results/{p})" for p in pngs) + "\n"
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{body}{END}", doc, flags=re.DOTALL)
    DOC.write_text(doc)
    print(f"wrote {DOC} and {len(pngs)} plots")


if __name__ == "__main__":
    main()
