"""bench/demo_policies.py on the CPU: the job it launches (the demo's own worker command with the interleaved
comparison), the per-pair ratios and the table from a synthetic report, bad arguments; demo_gpu's own checks of the
comparison options."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import demo_policies  # noqa: E402


def _summary(prefill, decode, median_step):
    return {"prefill": {"tokens_per_s": prefill, "modes": {"prefetch_all": 1}},
            "decode": {"tokens_per_s": decode, "tokens_per_s_median_step": median_step, "modes": {"dispatch": 15}}}


def _report():
    check = {"tokens_equal": True, "max_rel_err": 0.0, "comparable_rel_err": 0.0}
    runs = [({"auto": (9000, 600, 650), "on_demand": (4500, 200, 210)}), ({"auto": (9100, 500, 640), "on_demand": (4600, 250, 200)}),
            ({"auto": (8800, 700, 660), "on_demand": (4400, 175, 220)})]
    inter = [{"lead": ("auto", "on_demand")[i % 2],
              "runs": {p: {"summary": _summary(*v), "tokens_equal_main": True, "check": check} for p, v in r.items()}}
             for i, r in enumerate(runs)]
    return {"config": {"moe_layers": 6}, "ranks": [{"rank": 0, "interleaved": inter}]}


def test_ratios_are_medians_of_per_pair_ratios():
    rank = _report()["ranks"][0]
    r = demo_policies.ratios(rank, "auto", "on_demand")
    assert r["per_pair"]["decode"] == pytest.approx([3.0, 2.0, 4.0])
    assert r["median"]["decode"] == pytest.approx(3.0)  # not the ratio of medians (600 / 200)
    assert r["median"]["prefill"] == pytest.approx(2.0)
    assert r["median"]["decode_median_step"] == pytest.approx(650 / 210)


def test_table_has_a_row_per_rank_and_policy():
    rep = _report()
    for r in rep["ranks"]:
        r["ratios"] = demo_policies.ratios(r, "auto", "on_demand")
    rows = demo_policies.table(rep, "auto", "on_demand")
    assert len(rows) == 2 + 2
    assert "3.00 / " in rows[2] and "3.00, 2.00, 4.00" in rows[2] and "| True |" in rows[2]
    # the mode columns count every run's steps (3 runs of 1 prefill and 15 decode steps), not the first pair's
    assert "| prefetch_all x3 | dispatch x45 |" in rows[2]
    rep["ranks"][0]["interleaved"][1]["runs"]["auto"]["summary"]["decode"]["modes"] = {"on_demand": 15}
    assert "| dispatch x30, on_demand x15 |" in demo_policies.table(rep, "auto", "on_demand")[2]



def test_untimed_rates_give_none_ratios_and_n_a_in_the_table():
    """summarize reports a rate it could not time as None: a pair with one has no ratio (left out of the median) and
    the table prints n/a, where the division and the formatting had raised TypeError."""
    rep = _report()
    rank = rep["ranks"][0]
    rank["interleaved"][0]["runs"]["auto"]["summary"]["decode"]["tokens_per_s"] = None
    for pair in rank["interleaved"]:
        pair["runs"]["on_demand"]["summary"]["prefill"]["tokens_per_s"] = None
    r = demo_policies.ratios(rank, "auto", "on_demand")
    assert r["per_pair"]["decode"] == pytest.approx([None, 2.0, 4.0]) and r["median"]["decode"] == pytest.approx(3.0)
    assert r["per_pair"]["prefill"] == [None] * 3 and r["median"]["prefill"] is None
    rank["ratios"] = r
    rows = demo_policies.table(rep, "auto", "on_demand")
    assert "| 3.00 / 3.10; n/a, 2.00, 4.00 | n/a |" in rows[2] and "| n/a | 200.0 / 210.0 |" in rows[3]


def test_command_is_the_demo_worker_with_the_comparison(capsys):
    from dwdp_ops.launch import build_parser, worker_command

    ns = demo_policies.parse(["--policies", "auto,on_demand", "--pairs", "5", "--dtype", "bfloat16"])
    cmd = demo_policies.command(ns, 2, "/tmp/r.json")
    worker = worker_command(build_parser("x").parse_args(cmd[3:]))
    assert worker[1:3] == ["-m", "dwdp_ops.demo_gpu"]
    assert worker[-4:] == ["--compare-policy", "on_demand", "--pairs", "5"]
    assert "--policy" in worker and worker[worker.index("--policy") + 1] == "auto"
    assert demo_policies.main(["--dry-run"]) == 0 and "--compare-policy on_demand" in capsys.readouterr().out


POLICIES_MSG = "--policies needs two different policies of"
COUNTS_MSG = "--pairs and --prompts must be >= 1, --steps >= 2 and 1 <= --min-len <= --max-len"


# A bare pytest.raises(SystemExit) also takes sys.exit(0) (--help) or any other argparse error: each case checks
# argparse's usage-error exit status 2 and the message of the check it is about.
@pytest.mark.parametrize("argv, msg", [
    (["--policies", "auto"], POLICIES_MSG), (["--policies", "auto,auto"], POLICIES_MSG),
    (["--policies", "auto,fast"], POLICIES_MSG), (["--pairs", "0"], COUNTS_MSG), (["--steps", "1"], COUNTS_MSG),
    (["--min-len", "9", "--max-len", "8"], COUNTS_MSG),
], ids=["one-policy", "same-policy", "unknown-policy", "no-pairs", "one-step", "min-over-max"])
def test_bad_arguments_are_refused(argv, msg, capsys):
    with pytest.raises(SystemExit) as info:
        demo_policies.parse(argv)
    assert info.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--policy", "auto", "--compare-policy", "auto"], "--compare-policy must differ from --policy"),
    (["--compare-policy", "on_demand", "--pairs", "0"], "--pairs must be >= 1"),
], ids=["itself", "no-pairs"])
def test_demo_gpu_refuses_a_comparison_with_itself_or_no_pairs(argv, msg, capsys):
    from dwdp_ops import demo_gpu

    with pytest.raises(SystemExit) as info:
        demo_gpu.main(["--out", "/tmp/x.json"] + argv)
    assert info.value.code == 2 and msg in capsys.readouterr().err

