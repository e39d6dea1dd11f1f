"""Smoke tests of the benchmark suite (bench/): a broken benchmark fails here.

Tiny sizes only; no figure is judged.  Dobbin's side always runs; ZODB's
and Durus's only where they are installed (the "bench" extra).
"""

import os
import threading

import pytest
import transaction

from bench import report, runner
from bench.spec import CONTENDED_OBJECTS, SIZES, w5_expected
from bench.targets import CHECKS, Results, judge, paired_ratio

TINY = SIZES["tiny"]


@pytest.fixture(autouse=True)
def clean_transaction():
    transaction.abort()
    yield
    transaction.abort()


def _positive(result, *keys):
    for key in keys:
        assert result[key] > 0, (key, result)


def _single_process_workloads(module, tmp_path):
    """W1, W2, W3, W4 and W7 in this process, at tiny sizes."""
    _positive(module.w1(str(tmp_path / "w1"), TINY["w1_commits"]), "commits_per_s")
    w2_path = str(tmp_path / "w2")
    _positive(module.w2(w2_path, TINY["w2_objects"]), "objects_per_s")
    _positive(module.w3(w2_path, TINY["w2_objects"]), "open_ms", "scan_objects_per_s",
              "peak_rss_mib")
    w4_path = str(tmp_path / "w4")
    module.w4_setup(w4_path, TINY["w4_transactions"])
    _positive(module.w4(w4_path), "open_ms")
    source = tmp_path / "source"
    source.write_bytes(os.urandom(TINY["w7_mib"] << 20))
    _positive(module.w7(str(tmp_path / "w7"), str(source), TINY["w7_mib"]),
              "write_mib_s", "read_mib_s")


def test_dobbin_workloads(tmp_path):
    from bench import workloads_dobbin

    _single_process_workloads(workloads_dobbin, tmp_path)
    _positive(workloads_dobbin.w1(str(tmp_path / "none"), TINY["w1_commits"], "none"),
              "commits_per_s")
    path = str(tmp_path / "w5")
    workloads_dobbin.w5_setup(path)
    result = workloads_dobbin.w5_worker(path, 0, CONTENDED_OBJECTS + 3, True, go=lambda: None)
    assert result["retries"] == 0
    counters = workloads_dobbin.w5_counters(path)["counters"]
    assert counters == [2] * 3 + [1] * (CONTENDED_OBJECTS - 3) + [0] * CONTENDED_OBJECTS


def test_w5_expects_each_writer_s_increments_on_its_own_counters():
    assert w5_expected(12, shared=False) == [2, 2] + [1] * 8 + [2, 2] + [1] * 8
    assert w5_expected(12, shared=True) == [4, 4] + [2] * 8 + [0] * 10


def test_zodb_workloads(tmp_path):
    pytest.importorskip("ZODB")
    pytest.importorskip("BTrees")
    from bench import workloads_zodb

    _single_process_workloads(workloads_zodb, tmp_path)
    w4_path = str(tmp_path / "w4")
    _positive(workloads_zodb.w4(w4_path, drop_index=True), "open_ms")


def test_durus_workloads(tmp_path):
    pytest.importorskip("durus")
    from bench import workloads_durus

    _single_process_workloads(workloads_durus, tmp_path)
    _positive(workloads_durus.w1(str(tmp_path / "fsync"), TINY["w1_commits"], fsync=True),
              "commits_per_s")


def test_ratios_are_paired_per_run():
    results = Results(runs=3)
    for run, (ours, theirs) in enumerate([(10, 5), (30, 10), (8, 8)]):
        results.add(run, "dobbin", "", {"W2.objects_per_s": ours})
        results.add(run, "zodb", "", {"W2.objects_per_s": theirs})
    # Per-run ratios 2, 3, 1: the median is 2, not median(ours) / median(theirs).
    assert paired_ratio(results, ("W2.objects_per_s", "dobbin"),
                        ("W2.objects_per_s", "zodb")) == 2
    check = next(check for check in CHECKS if check.measure == "W2.objects_per_s")
    verdict = judge(check, results)
    assert verdict.met and verdict.score == 1.0
    lost = next(check for check in CHECKS if check.measure == "W5-same.lost_updates")
    assert judge(lost, results).met is None  # not measured is not "met"


def test_a_count_that_must_be_exact_is_judged_by_its_worst_run():
    # The median of lost updates [0, 7, 0] was 0: "met" with 7 lost.
    lost = next(check for check in CHECKS if check.measure == "W5-same.lost_updates")
    results = Results(runs=3)
    for run, count in enumerate([0, 7, 0]):
        results.add(run, "dobbin", "", {"W5-same.lost_updates": count})
    verdict = judge(lost, results)
    assert verdict.value == 7 and verdict.met is False
    results = Results(runs=3)
    for run in (0, 2):  # run 1 failed: nothing recorded
        results.add(run, "dobbin", "", {"W5-same.lost_updates": 0})
    assert judge(lost, results).met is False
    results.add(1, "dobbin", "", {"W5-same.lost_updates": 0})
    assert judge(lost, results).met is True


@pytest.mark.slow
def test_runner_dobbin_only(tmp_path, capsys):
    """The whole pipeline (fresh processes, W5's writers, tables) for Dobbin."""
    session = runner.run_benchmarks(["W5", "W7"], ["dobbin"], TINY, 1, str(tmp_path),
                                    log=lambda message: None)
    assert session["failures"] == 0, session["notes"]
    results = session["results"]
    for key in ("W5-disjoint.commits_per_s", "W5-same.commits_per_s", "W7.write_mib_s",
                "W7.read_mib_s", "limits.write_mib_s"):
        variant = "machine" if key.startswith("limits.") else "dobbin"
        assert results[(key, variant)][0] > 0, key
    assert results[("W5-same.lost_updates", "dobbin")] == [0]
    assert results[("W5-disjoint.lost_updates", "dobbin")] == [0]
    session["mode"] = "tiny"
    assert "W1 durable vs ZODB" in report.tables(session)
    pytest.importorskip("matplotlib")
    report.write(session, str(tmp_path / "benchmarks.md"), str(tmp_path / "benchmarks.png"))
    assert (tmp_path / "benchmarks.png").stat().st_size > 0


@pytest.mark.slow
def test_command_line_quick_w1(tmp_path, capsys):
    """`python -m bench --quick --only W1 --no-write`, Dobbin only."""
    code = runner.main(["--quick", "--only", "W1", "--no-write", "--systems", "dobbin",
                        "--dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "fsyncs_per_s" in out and "W1 durable vs machine fsync rate" in out


def test_broker_bench_runs_both_sides_and_stops_its_servers(capsys):
    pytest.importorskip("ZEO")
    from bench import bench_broker

    before = {t.name for t in threading.enumerate()}
    bench_broker.main(["--objects", "120", "--samples", "3", "--commits", "6", "--clients", "2"])
    out = capsys.readouterr().out
    for line in ("(a) uncached load, broker", "(a) uncached load, ZEO",
                 "(b) ... ZEO begin(), server_sync=True", "(c) commits/s, broker (fsync), 2 clients",
                 "(a) broker load / raw, spinning alike", "(c) broker / ZEO commits/s, 2 clients"):
        assert line in out
    figures = [float(word) for line in out.splitlines() if line.startswith(("(a)", "(b)", "(c)"))
               for word in line.split()[-2:] if word.replace(".", "").isdigit()]
    assert figures and all(figure > 0 for figure in figures)
    assert {t.name for t in threading.enumerate() if t.is_alive()} <= before
