"""The benchmarks' post-measurement code on several ranks' synthetic records (no GPU): what rank 0 computes, prints
and renders from the gathered per-rank data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import fetch_bandwidth  # noqa: E402
import prefetch_overlap as po  # noqa: E402
import render  # noqa: E402

MiB = 1 << 20


def test_every_peer_part_is_whole_2mib_slices_of_the_largest_size():
    assert fetch_bandwidth.every_peer_part(1024 * MiB, 2) == 1024 * MiB
    assert fetch_bandwidth.every_peer_part(1024 * MiB, 8) == 146 * MiB
    assert fetch_bandwidth.every_peer_part(6 * MiB, 4) == 2 * MiB
    assert fetch_bandwidth.every_peer_part(2 * MiB, 4) == 0  # refused by main (see test_bench_args)


def _slowdown(T, ce, nv):
    return {"tokens": T, "gemm_ms": 16.8, "slowdown_ce": ce, "slowdown_nvshmem16": nv}


def _exposed(T, frac, tflops):
    return {"tokens": T, "gemm_layer_ms": 5.5, "gemm_tflops": tflops, "step_ms": 130.0, "step_over_alone": 1.5,
            "wait_ms_per_layer": [30.0, 1.0, 2.0], "steady_exposed_ms": 2.0, "steady_exposed_frac": frac}


def _overlap_rank(exposed, slowdown, skipped=None):
    rec = {"fetch_ce_gbps": 372.6, "nvshmem16_over_ce": 1.27, "slowdown": slowdown, "exposed": exposed,
           "roofline": po.roofline(exposed, 372.6, "float16", 128)}
    if skipped:
        rec["skipped_tokens"] = skipped
    return rec


def test_prefetch_overlap_roofline_and_summary_on_two_ranks():
    r0 = _overlap_rank([_exposed(1024, 0.5, 132.0), _exposed(8192, 0.25, 661.0)], [_slowdown(16384, 0.047, 0.209)])
    r1 = _overlap_rank([_exposed(1024, 0.75, 130.0), _exposed(8192, 0.125, 650.0)], [_slowdown(16384, 0.052, 0.2)])
    rf = r0["roofline"]
    assert rf["C_tflops"] == pytest.approx(661.0)
    assert rf["T_star"] == pytest.approx(po.t_star(256, 128, 2, 661e12, 372.6, 8))
    lines = po.summary([r0, r1])
    assert len(lines) == 1 + 1 + 2
    assert "C=661 TFLOP/s T*=" in lines[0]
    assert "+CE +4.7% (worst rank +5.2%)" in lines[1] and "(worst rank +20.9%)" in lines[1]
    assert "(worst rank 75.00%)" in lines[2] and "(worst rank 25.00%)" in lines[3]  # the larger rank's, per row


def test_prefetch_overlap_without_any_token_count_keeps_its_record():
    """Every token count skipped (the activations did not fit beside the store on some rank): the record keeps the
    fetch and slowdown figures with C and T* None; it had failed on max() of an empty list before writing anything."""
    ranks = [_overlap_rank([], [_slowdown(16384, 0.047, 0.209)], [65536]) for _ in range(2)]
    assert ranks[0]["roofline"] == {"C_tflops": None, "B_gbps": 372.6, "bytes_per_param": 2, "dtype": "float16",
                                    "T_star": None}
    lines = po.summary(ranks)
    assert len(lines) == 2 and "C, T*: none" in lines[0] and "65536" in lines[0]


def test_render_plot_keeps_the_layer_cases_of_one_file_apart(tmp_path, monkeypatch):
    """One job with the default --dtypes float8_e4m3fn,bfloat16 writes two dwdp_layer cases whose modes share names:
    each record gets its own bar (they had been drawn over each other, 14 rows for 28 records, titled by the first
    case only). (matplotlib is the optional ``bench`` extra: skipped without it.)"""
    plt = pytest.importorskip("matplotlib.pyplot")
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))  # a closed figure keeps its axes
    modes = ["ce_staggered", "nvshmem_ptr_132sm"]
    recs = [{"case": f"dwdp_layer_{dt}", "mode": m, "gbps_min": g, "bytes": 1 << 30}
            for dt, gs in (("float8_e4m3fn", (372.3, 336.0)), ("bfloat16", (372.5, 337.8))) for m, g in zip(modes, gs)]
    d = {"card": "NVIDIA H200", "world_size": 2, "nvlink": {"links": 18, "gbps_per_link": 26.562}, "records": recs}
    assert render.plot([("fetch_bandwidth_H200_N2.json", d), ("fetch_bandwidth_H200_N2_one.json",
                                                              {**d, "records": recs[:2]})]) == [
        "fetch_bandwidth_H200_N2.png", "fetch_bandwidth_H200_N2_one.png"]
    two, one = (f.axes[0] for f in figs)
    assert len({round(p.get_y(), 6) for p in two.patches}) == 4
    assert {t.get_text() for t in two.get_yticklabels()} == {f"{m} ({c})" for m in modes for c in
                                                              ("dwdp_layer_float8_e4m3fn", "dwdp_layer_bfloat16")}
    assert "dwdp_layer_float8_e4m3fn, dwdp_layer_bfloat16" in two.get_title()
    assert {t.get_text() for t in one.get_yticklabels()} == set(modes)  # one case: labelled as before


def test_render_links_counted_without_a_rate():
    """Links counted but the per-link rate missing or 0.0 (an ``nvidia-smi`` that lists the links without speeds):
    the text names the links and says the rate is unknown; it had said "no NVLink (4 links ...)"."""
    for rate in (None, 0.0):
        d = {"nvlink": {"links": 4, "gbps_per_link": rate, "raw": ""}}
        link = render.link_rate(d)
        assert link is None
        text = render.link_text(d, link)
        assert "no NVLink" not in text and "4 links" in text and "link rate unknown" in text


def test_render_a_record_without_nvlink(tmp_path, monkeypatch):
    """A PCIe-only machine's record: ``nvlink_facts`` gives 0 links and no per-link rate (an older file has no
    ``nvlink`` at all). The tables and plots say the link rate is unknown and leave the fractions of it out; render had
    failed on 0 * None (TypeError) in link_rate."""
    import json

    d = json.loads((ROOT / "bench" / "results" / "fetch_bandwidth_H200_N4.json").read_text())  # sweep and layer
    d["nvlink"] = {"links": 0, "gbps_per_link": None, "raw": ""}  # nvidia-smi nvlink -s without a link (or failing)
    d["driver"] = None
    older = {k: v for k, v in d.items() if k != "nvlink"}
    files = [("fetch_bandwidth_X_N4.json", d), ("fetch_bandwidth_X_N4_older.json", older)]
    text = render.tables(files)
    assert text.count("no NVLink") == 1 and text.count("NVLink not recorded") == 1
    assert text.count("link rate unknown") == 2 and "driver None" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| mode", "| ---"))]
    assert len(rows) == 2 * len(d["records"])
    assert all(line.endswith("% | - |") for line in rows)  # of raw peer copy kept, of NVLink absent
    plt = pytest.importorskip("matplotlib.pyplot")  # (the plots: the optional ``bench`` extra)
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figs.append(fig), close(fig)))
    assert render.plot(files) == ["fetch_bandwidth_X_N4.png", "fetch_bandwidth_X_N4_older.png"]
    assert (tmp_path / "fetch_bandwidth_X_N4.png").stat().st_size > 0
    for fig in figs:
        sweep, layer = fig.axes
        assert "NVLink physical" not in [line.get_label() for line in sweep.lines]  # no link-rate line
        assert not layer.lines
        assert sweep.get_title().endswith(" (no NVLink rate)") and layer.get_title().endswith(" (no NVLink rate)")


def test_prefetch_overlap_steady_state_is_none_without_a_layer_past_the_warm_up():
    """Layers 0-1 are the warm-up (module docstring); the steady figures are the worst of layers >= 2. With --layers 2
    (the smoke run's) there is no steady layer: the fields are None and the summary says so. They had silently taken
    the warm-up layers instead (here 0.5 of the layer from layer 0's wait, reported as the steady state)."""
    alone = [[2.0, 2.0], [2.0, 2.0]]
    wait = [[1.0, 0.1], [1.0, 0.2]]
    layer = [[3.0, 2.1], [3.0, 2.2]]
    st = po.exposed_stats(alone, wait, layer)
    assert st["steady_exposed_ms"] is None and st["steady_exposed_frac"] is None
    assert st["exposed_frac_per_layer"] == pytest.approx([0.5, 0.075])
    st4 = po.exposed_stats([[2.0] * 4] * 3, [[1.0, 0.1, 0.2, 0.4], [1.0, 0.3, 0.6, 0.2], [1.0, 0, 0.1, 0.1]],
                           [[3.0] * 4] * 3)
    assert st4["steady_exposed_ms"] == pytest.approx(0.4)  # median over repeats of the worst steady layer
    assert st4["steady_exposed_frac"] == pytest.approx(0.2)
    assert st4["wait_ms_per_layer"] == pytest.approx([1.0, 0.1, 0.2, 0.2])
    x = {**_exposed(1024, None, 132.0), "steady_exposed_ms": None}
    lines = po.summary([_overlap_rank([x], []), _overlap_rank([x], [])])
    assert "no steady layer" in lines[1]
