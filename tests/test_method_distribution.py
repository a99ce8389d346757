"""Every weighting and aggregator is exact under data parallelism.

For every registered method (tests/method_runs.py lists the cases from the
registries, so a new method is covered by registering it): 1, 2 and 4
replicas give the same trained weights, step metrics and method state as
one device, to 1e-5; the same model written in Keras 3 trains like the
tf_keras one on 2 replicas, to 1e-6; and 2 worker processes under
MultiWorkerMirroredStrategy equal 2 replicas in one process.
"""

import os
import subprocess
import sys

from conftest import make_strategy
from conftest import time_limit
import method_runs
import numpy as np
import pytest

from launch import local_cluster

CASES = method_runs.cases()


def _assert_equal(got: dict, want: dict, tolerance: float = 1e-5) -> None:
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, atol=tolerance,
                               rtol=tolerance, err_msg=key)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_1_2_and_4_replicas_equal_one_device_in_tf_keras_and_keras3(case):
  single = method_runs.train_case(make_strategy(1), case)
  assert single[f"{case.name}/moved"] > 0, "training changed nothing"
  two = method_runs.train_case(make_strategy(2), case)
  _assert_equal(two, single)
  _assert_equal(method_runs.train_case(make_strategy(4), case), single)
  _assert_equal(method_runs.train_case(make_strategy(2), case, keras3=True),
                two, tolerance=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("localhost_cluster")
def test_two_workers_equal_two_replicas_for_every_method(tmp_path):
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  output = tmp_path / "cluster.npz"
  ports = local_cluster.free_ports(2)
  script = os.path.join(os.path.dirname(__file__), "method_runs.py")
  workers = [subprocess.Popen(
      [sys.executable, script, str(output)],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch),
               TF_CONFIG=local_cluster.tf_config(ports, i),
               PYTHONPATH=os.pathsep.join(sys.path)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  # Generous: two processes trace one trainer per case on a shared CPU.
  limit = time_limit(56)
  outputs = [worker.communicate(timeout=limit)[0] for worker in workers]
  for worker, text in zip(workers, outputs):
    assert worker.returncode == 0, text[-4000:]
  got = np.load(output)
  _assert_equal({key: got[key] for key in got.files},
                method_runs.train_all(make_strategy(2)))
