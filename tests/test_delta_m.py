"""Delta_m against single-task baselines."""

import json

import pytest

import mtl_dist
from mtl_dist.run import delta_m


def test_delta_m_matches_formula():
  baselines = {"shape": {"accuracy": 0.80},
               "x": {"mae": 0.10, "mse": 0.02}}
  results = {"shape": {"accuracy": 0.88, "loss": 0.3},
             "x": {"mae": 0.09, "mse": 0.025, "loss": 0.025}}
  got = delta_m.delta_m(results, baselines)
  shape = 100 * (0.88 - 0.80) / 0.80  # +10%: higher accuracy is better.
  x = 100 * ((0.10 - 0.09) / 0.10 + (0.02 - 0.025) / 0.02) / 2  # -7.5%
  assert got["shape"] == pytest.approx(shape)
  assert got["x"] == pytest.approx(x)
  assert got["delta_m"] == pytest.approx((shape + x) / 2)


def test_read_baselines_refuses_missing_results(tmp_path):
  run = tmp_path / "single"
  run.mkdir()
  with pytest.raises(mtl_dist.ConfigError, match="cannot read"):
    delta_m.read_baselines({"x": str(run)})
  (run / "summary.json").write_text(json.dumps(
      {"eval": {"shape": {"accuracy": 0.9, "loss": 0.2}}}))
  with pytest.raises(mtl_dist.ConfigError, match="no eval results for task"):
    delta_m.read_baselines({"x": str(run)})
  assert delta_m.read_baselines({"shape": str(run)}) == {
      "shape": {"accuracy": 0.9}}
  (run / "summary.json").write_text(json.dumps(
      {"eval": {"shape": {"accuracy": 0.0}}}))
  with pytest.raises(mtl_dist.ConfigError, match="its accuracy is 0"):
    delta_m.read_baselines({"shape": str(run)})


def test_training_with_baselines_reports_delta_m(tmp_path):
  common = dict(train_examples=512, eval_examples=256, train_steps=40,
                steps_per_loop=20, log_every=20, eval_every=40,
                checkpoint_every=40, trunk_width=32)
  singles = {}
  for task in ("shape", "x"):
    singles[task] = str(tmp_path / task)
    mtl_dist.train(mtl_dist.TrainConfig(model_dir=singles[task],
                                        tasks=[task], **common))
  summary = mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=str(tmp_path / "joint"), tasks=["shape", "x"],
      baselines=singles, **common))
  expected = delta_m.delta_m(summary["eval"],
                             delta_m.read_baselines(singles))
  assert summary["delta_m"] == pytest.approx(expected)
  saved = json.loads((tmp_path / "joint" / "summary.json").read_text())
  assert saved["delta_m"]["delta_m"] == pytest.approx(expected["delta_m"])
  with pytest.raises(mtl_dist.ConfigError, match="--baselines: 'y'"):
    mtl_dist.train(mtl_dist.TrainConfig(
        model_dir=str(tmp_path / "bad"), tasks=["shape", "x"],
        baselines={"y": singles["x"]}, **common))
  assert not (tmp_path / "bad").exists()
