"""benchmarks/gpu.py's table of medians over alternating rounds of the one-GPU setups."""

from benchmarks.gpu import one_gpu_summary


def _row(setup, round_, step_ms, ratio):
    return {"model": "gpt", "setup": setup, "round": round_, "step ms": step_ms, "vs single process": ratio}


def test_the_summary_takes_each_setups_median_lowest_and_highest_ratio_over_its_rounds():
    rows = [_row("single", 1, 18.0, 1.0), _row("PS", 1, 20.0, 0.9),
            _row("single", 2, 24.0, 1.0), _row("PS", 2, 21.0, 1.14),
            _row("single", 3, 18.5, 1.0), _row("PS", 3, 22.0, 0.84),
            {"model": "gpt", "setup": "PS", "round": 4, "error": "the server died"}]
    summary = {row["setup"]: row for row in one_gpu_summary(rows)}
    assert summary["PS"] == {"model": "gpt", "setup": "PS", "rounds": 3, "median step ms": 21.0,
                             "median vs single": 0.9, "lowest": 0.84, "highest": 1.14}
    assert summary["single"]["median step ms"] == 18.5 and summary["single"]["rounds"] == 3


def test_a_setup_that_failed_in_every_round_has_no_summary_row():
    rows = [_row("single", 1, 18.0, 1.0), {"model": "gpt", "setup": "PS", "round": 1, "error": "x"}]
    assert [row["setup"] for row in one_gpu_summary(rows)] == ["single"]
