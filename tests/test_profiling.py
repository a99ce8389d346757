"""--profile_steps: a TensorBoard profile of exactly steps A..B."""

import glob
import os

import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.loop import profiling
from mtl_dist.loop import trainer as trainer_lib
from mtl_dist.run import training as training_lib


def _config(model_dir, **changes):
  values = dict(model_dir=str(model_dir), tasks=["shape", "x"],
                train_examples=512, eval_examples=128, train_steps=20,
                steps_per_loop=50, log_every=20, eval_every=20,
                checkpoint_every=20, trunk_width=16, num_cpu_devices=2,
                profile_steps=[3, 5])
  values.update(changes)
  return mtl_dist.TrainConfig(**values)


@pytest.fixture
def profiler_calls(monkeypatch):
  """Records profiler starts and stops instead of profiling."""
  calls = []
  monkeypatch.setattr(tf.profiler.experimental, "start",
                      lambda logdir: calls.append(("start", logdir)))
  monkeypatch.setattr(tf.profiler.experimental, "stop",
                      lambda: calls.append(("stop",)))
  return calls


def test_loop_calls_end_at_the_profile_boundaries():
  steps_until_next_event = training_lib._steps_until_next_event  # pylint: disable=protected-access
  config = _config("unused")
  step, calls = 0, []
  while step < config.train_steps:
    calls.append(steps_until_next_event(step, config))
    step += calls[-1]
  assert calls == [2, 3, 15]
  config.profile_steps = [1, 20]
  assert steps_until_next_event(0, config) == 20


def test_the_profile_covers_exactly_steps_a_to_b(tmp_path, monkeypatch,
                                                 profiler_calls):
  train = trainer_lib.Trainer.train

  def recording_train(self, iterators, num_steps):
    profiler_calls.append(("train", num_steps))
    return train(self, iterators, num_steps)

  monkeypatch.setattr(trainer_lib.Trainer, "train", recording_train)
  mtl_dist.train(_config(tmp_path / "run"))
  logdir = os.path.join(str(tmp_path / "run"), "tensorboard", "train")
  assert profiler_calls == [("train", 2), ("start", logdir), ("train", 3),
                            ("stop",), ("train", 15)]


def test_a_resumed_run_profiles_the_rest_of_the_window(profiler_calls):
  profiler = profiling.StepProfiler("logs", [3, 8])
  profiler.before_loop(4)  # Resumed inside the window.
  profiler.after_loop(6)
  profiler.before_loop(6)  # Still running: no second start.
  profiler.after_loop(8)
  profiler.before_loop(8)
  profiler.close()  # Nothing left running.
  assert profiler_calls == [("start", "logs"), ("stop",)]
  inactive = profiling.StepProfiler("logs", [3, 8], active=False)
  inactive.before_loop(2)
  assert profiler_calls == [("start", "logs"), ("stop",)]


def test_a_run_writes_an_xplane_profile_where_tensorboard_reads(tmp_path):
  summary = mtl_dist.train(_config(tmp_path / "run", profile_steps=[2, 4]))
  assert summary["step"] == 20
  profiles = glob.glob(str(tmp_path / "run" / "tensorboard" / "train" /
                           "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(profiles) == 1 and os.path.getsize(profiles[0]) > 0


@pytest.mark.parametrize("steps, message", [
    ([5, 2], "--profile_steps=5,2: need 1 <= A <= B <= --train_steps=20"),
    ([0, 3], "--profile_steps=0,3: need 1 <= A"),
    ([3, 21], "--profile_steps=3,21: need"),
    ([3], "--profile_steps=3: expected two step numbers A,B"),
    ([1, 2, 3], "--profile_steps=1,2,3: expected two"),
])
def test_bad_profile_steps_are_refused(tmp_path, steps, message):
  with pytest.raises(mtl_dist.ConfigError, match=message):
    mtl_dist.train(_config(tmp_path / "run", profile_steps=steps))
  assert not (tmp_path / "run").exists()
