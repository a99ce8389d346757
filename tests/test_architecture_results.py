"""The arithmetic and wording of benchmarks/architectures.py, without training.

Small hand-made run summaries go through the pure functions that make
docs/architecture_results.md: per-seed summaries to mean ± std rows, the
Markdown table and the sentences comparing each architecture's Δm with
hps's. The expected cells and sentences are computed here with NumPy.
"""

import numpy as np
import pytest

from benchmarks import architectures as bench

SEEDS = 3
# Per architecture: shape accuracy, x MAE, Δm (%) and examples/s per seed.
# hps's Δm is 2 ± 1; mmoe's is better by more than the spread, mtan's worse,
# cgc's within it, and dselect_k's differs by exactly the spread (within).
RUNS = {
    "hps": ([0.90, 0.92, 0.94], [0.051, 0.049, 0.050], [1.0, 2.0, 3.0],
            [1000.0, 1200.0, 900.0]),
    "mmoe": ([0.95, 0.96, 0.97], [0.041, 0.043, 0.042], [4.5, 5.0, 5.5],
             [400.0, 500.0, 450.0]),
    "mtan": ([0.80, 0.82, 0.81], [0.071, 0.073, 0.069], [-3.0, -2.0, -1.0],
             [300.0, 250.0, 200.0]),
    "cgc": ([0.91, 0.93, 0.92], [0.048, 0.050, 0.052], [1.5, 2.5, 3.5],
            [600.0, 500.0, 700.0]),
    "dselect_k": ([0.93, 0.92, 0.91], [0.047, 0.049, 0.051],
                  [2.0, 3.0, 4.0], [800.0, 800.0, 800.0]),
}
PARAMETERS = {"hps": 1000, "mmoe": 4200, "mtan": 1500, "cgc": 5000,
              "dselect_k": 4300}


def _summaries(architecture, with_delta_m=True):
  """One summary per seed, shaped like `mtl_dist.train`'s."""
  accuracy, mae, delta, speed = RUNS[architecture]
  summaries = []
  for seed in range(SEEDS):
    summary = {
        "step": 100,
        "eval": {"shape": {"loss": 0.3, "accuracy": accuracy[seed]},
                 "x": {"loss": 0.01, "mse": 0.004, "mae": mae[seed]}},
        "examples_per_second": speed[seed],
    }
    if with_delta_m:
      summary["delta_m"] = {"delta_m": delta[seed], "shape": 0.0, "x": 0.0}
    summaries.append(summary)
  return summaries


def _mean_std(values):
  return np.mean(values), np.std(values, ddof=1)


def test_aggregate_takes_each_tasks_metric_over_seeds():
  row = bench.aggregate(_summaries("mmoe"))
  accuracy, mae, delta, speed = RUNS["mmoe"]
  # Accuracy for the classification task, MAE (not mse or loss) for x.
  assert row.metrics["shape"][0] == "accuracy"
  assert row.metrics["x"][0] == "mae"
  for (_, stat), values in ((row.metrics["shape"], accuracy),
                            (row.metrics["x"], mae),
                            ((None, row.delta_m), delta)):
    mean, std = _mean_std(values)
    assert stat.mean == pytest.approx(mean)
    assert stat.std == pytest.approx(std)
    assert stat.count == SEEDS
  assert row.examples_per_second == pytest.approx(np.median(speed))
  assert bench.aggregate(_summaries("mmoe", with_delta_m=False)).delta_m is None


def test_one_seed_has_no_spread():
  row = bench.aggregate(_summaries("hps")[:1])
  assert row.metrics["shape"][1].std == 0.0
  assert bench.format_stat(row.metrics["shape"][1]) == "0.900"
  assert bench.format_delta_m(row.delta_m) == "+1.00"


def test_baseline_row_merges_the_single_task_runs():
  per_seed = []
  for seed in range(SEEDS):
    full = _summaries("hps")[seed]
    per_seed.append({
        task: {"eval": {task: full["eval"][task]},
               "examples_per_second": 5.0}
        for task in ("shape", "x")})
  row = bench.baseline_row(per_seed)
  mean, std = _mean_std(RUNS["hps"][1])
  assert row.metrics["x"][1].mean == pytest.approx(mean)
  assert row.metrics["x"][1].std == pytest.approx(std)
  assert row.delta_m is None and row.examples_per_second is None


def _rows():
  rows = {("joint", name): bench.aggregate(_summaries(name)) for name in RUNS}
  rows[("alternate", "hps")] = bench.aggregate(_summaries("hps"))
  return rows


def _cells(line):
  """A Markdown table line's cells."""
  return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_cells():
  lines = bench.results_table(("shape", "x"), _rows(), PARAMETERS)
  assert lines[0] == ("| mode | architecture | parameters | step time vs hps "
                      "| Δm (%) | shape (accuracy) | x (mae) |")
  cells = {tuple(_cells(line)[:2]): _cells(line) for line in lines[2:]}
  assert len(cells) == len(RUNS) + 1
  hps_speed = np.median(RUNS["hps"][3])
  for name, (accuracy, mae, delta, speed) in RUNS.items():
    row = cells[("joint", name)]
    assert row[2] == f"{PARAMETERS[name]:,}"
    assert row[3] == f"{hps_speed / np.median(speed):.2f}×"
    mean, std = _mean_std(delta)
    assert row[4] == f"{mean:+.2f} ± {std:.2f}"
    # Three significant digits: 0.9x to 3 decimals, 0.0xx to 4.
    mean, std = _mean_std(accuracy)
    assert row[5] == f"{mean:.3f} ± {std:.3f}"
    mean, std = _mean_std(mae)
    assert row[6] == f"{mean:.4f} ± {std:.4f}"
  assert cells[("joint", "hps")][3] == "1.00×"
  assert cells[("alternate", "hps")][3] == "1.00×"


def test_table_starts_with_the_single_task_baselines():
  baseline = bench.aggregate(_summaries("hps"))
  lines = bench.results_table(("shape", "x"), _rows(), PARAMETERS,
                              baseline=baseline, baseline_parameters=12345)
  assert _cells(lines[2])[:5] == [
      "single-task", "hps, one model per task", "12,345", "–",
      "0 (reference)"]


def test_step_time_needs_hps_in_the_same_mode():
  rows = {("alternate", "mmoe"): bench.aggregate(_summaries("mmoe")),
          ("joint", "hps"): bench.aggregate(_summaries("hps")),
          ("joint", "mtan"): bench.aggregate(_summaries("mtan"))}
  times = bench.relative_step_times(rows)
  assert set(times) == {("joint", "hps"), ("joint", "mtan")}
  assert times[("joint", "mtan")] == pytest.approx(
      np.median(RUNS["hps"][3]) / np.median(RUNS["mtan"][3]))


def _delta(name):
  mean, std = _mean_std(RUNS[name][2])
  return f"{mean:+.2f} ± {std:.2f} %", std


def test_sentences_compare_delta_m_with_hps_beyond_the_spread():
  rows = {name: bench.aggregate(_summaries(name)) for name in RUNS}
  sentences = bench.comparison_sentences("shapes", "joint", rows)
  hps, hps_std = _delta("hps")
  where = "On shapes, joint mode"
  expected = [
      (f"{where}, better than hps beyond the seeds' spread: mmoe; within "
       "the seeds' spread of hps (not better): cgc, dselect_k; worse than "
       "hps beyond the seeds' spread: mtan."),
      (f"{where}, hps's Δm is {hps}: better than the single-task baselines "
       "by more than its std."),
  ]
  for name, relation in (("mmoe", "better"), ("mtan", "worse"),
                         ("cgc", "within"), ("dselect_k", "within")):
    own, std = _delta(name)
    spread = max(std, hps_std)
    if relation == "within":
      expected.append(f"{where}, {name}'s Δm ({own}) is within the seeds' "
                      f"spread ({spread:.2f}) of hps's ({hps}): not better "
                      "than hps.")
    else:
      expected.append(f"{where}, {name}'s Δm ({own}) is {relation} than "
                      f"hps's ({hps}) by more than the seeds' spread "
                      f"({spread:.2f}).")
  assert sentences == expected


def test_sentences_when_nothing_or_everything_helps():
  worse = {name: bench.aggregate(_summaries(name)) for name in ("hps", "mtan")}
  assert bench.comparison_sentences("toy_regression", "alternate",
                                    worse)[0] == (
      "On toy_regression, alternate mode, no architecture is better than hps "
      "beyond the seeds' spread (worse than hps beyond the seeds' spread: "
      "mtan).")
  better = {name: bench.aggregate(_summaries(name)) for name in ("hps", "mmoe")}
  assert bench.comparison_sentences("shapes", "joint", better)[0] == (
      "On shapes, joint mode, better than hps beyond the seeds' spread: "
      "mmoe.")
  assert bench.comparison_sentences("shapes", "joint", {
      "mmoe": better["mmoe"]}) == []


def test_one_seed_sentences_do_not_claim_a_spread():
  rows = {name: bench.aggregate(_summaries(name)[:1])
          for name in ("hps", "mtan")}
  hps = RUNS["hps"][2][0]
  mtan = RUNS["mtan"][2][0]
  assert bench.comparison_sentences("shapes", "joint", rows) == [
      ("On shapes, joint mode, no architecture is better than hps on one "
       "seed (worse than hps on one seed: mtan)."),
      (f"On shapes, joint mode, hps's Δm is {hps:+.2f} %: better than the "
       "single-task baselines on one seed."),
      (f"On shapes, joint mode, mtan's Δm ({mtan:+.2f} %) is worse than "
       f"hps's ({hps:+.2f} %) on one seed (no spread measured)."),
  ]


def test_report_has_a_table_and_the_verdicts_per_mode():
  rows = _rows()
  text = bench.report(
      [bench.DatasetResults(name="shapes", tasks=("shape", "x"),
                            description="Settings.", rows=rows,
                            parameters=PARAMETERS)],
      header=["# Title"], notes=["A note."])
  assert text.startswith("# Title\n\n## shapes\n\nSettings.\n\n| mode |")
  verdicts = text[text.index("## Where an architecture does not help"):]
  assert "- On shapes, joint mode, mtan's Δm" in verdicts
  assert "- On shapes, alternate mode, only hps ran." in verdicts
  assert text.endswith("\nA note.\n")
