"""Cluster resolution from TF_CONFIG and SLURM, on faked environments."""

import json
import os
import signal
import sys
import threading

from conftest import wait_until
import pytest

from launch import local_cluster
import mtl_dist
from mtl_dist.cluster import resolver as cluster_lib

_SLURM_AND_TF = ("TF_CONFIG", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
                 "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE",
                 "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def clean_env(monkeypatch):
  """No cluster variables, and no nvidia-smi on PATH."""
  for name in _SLURM_AND_TF + ("SLURM_GPUS_PER_TASK",):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("PATH", "/nonexistent")
  monkeypatch.setattr(cluster_lib, "_node_gpus", None)
  return monkeypatch


def slurm(env, procid, nodelist, tasks_per_node, num_tasks):
  env.setenv("SLURM_PROCID", str(procid))
  env.setenv("SLURM_STEP_NUM_TASKS", str(num_tasks))
  env.setenv("SLURM_STEP_NODELIST", nodelist)
  env.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)


def test_slurm_two_nodes_two_tasks_each_on_cpu_nodes(clean_env):
  slurm(clean_env, 3, "node[01-02]", "2(x2)", 4)
  resolver = cluster_lib.resolve("slurm", port_base=9000)
  assert resolver.cluster_spec().as_dict() == {
      "worker": ["node01:9000", "node01:9001", "node02:9000", "node02:9001"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 3)
  assert resolver.num_accelerators() == {"GPU": 0}
  assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slurm_bracketed_node_list_and_uneven_tasks(clean_env):
  slurm(clean_env, 4, "node[01-04,07]", "1(x5)", 5)
  resolver = cluster_lib.resolve("slurm")
  assert resolver.cluster_spec().as_dict()["worker"] == [
      "node01:8888", "node02:8888", "node03:8888", "node04:8888",
      "node07:8888"]
  assert resolver.task_id == 4

  slurm(clean_env, 6, "a,b[1-2],c", "2(x3),1", 7)
  resolver = cluster_lib.resolve(None)  # Detected from SLURM_STEP_*.
  assert resolver.cluster_spec().as_dict()["worker"] == [
      "a:8888", "a:8889", "b1:8888", "b1:8889", "b2:8888", "b2:8889",
      "c:8888"]
  assert (resolver.task_type, resolver.task_id) == ("worker", 6)


def test_slurm_gpu_nodes_share_the_visible_gpus(clean_env):
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
  slurm(clean_env, 1, "gpu[1-2]", "2(x2)", 4)
  resolver = cluster_lib.resolve("slurm")
  resolver.cluster_spec()
  assert resolver.task_id == 1
  assert resolver.num_accelerators() == {"GPU": 2}
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_slurm_gpus_bound_per_task_are_kept(clean_env):
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "5")
  clean_env.setenv("SLURM_GPUS_PER_TASK", "1")
  slurm(clean_env, 1, "gpu[1-2]", "2(x2)", 4)
  resolver = cluster_lib.resolve("slurm")
  resolver.cluster_spec()
  assert resolver.num_accelerators() == {"GPU": 1}
  assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_slurm_resolving_twice_keeps_the_share(clean_env):
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  slurm(clean_env, 1, "gpu1", "2", 2)
  for _ in range(2):
    cluster_lib.resolve("slurm").cluster_spec()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("visible, message", [
    ("0", "1 GPU\\(s\\) per node cannot be shared by 2 tasks"),
])
def test_slurm_too_few_gpus_is_refused(clean_env, visible, message):
  clean_env.setenv("CUDA_VISIBLE_DEVICES", visible)
  slurm(clean_env, 0, "gpu1", "2", 2)
  with pytest.raises(mtl_dist.ConfigError, match=message):
    cluster_lib.resolve("slurm")


def test_no_gpu_markers_count_as_no_gpu(clean_env):
  for marker in ("NoDevFiles", "-1", ""):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", marker)
    assert cluster_lib.visible_gpu_ids() == []
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,GPU-3f2a-11")
  assert cluster_lib.visible_gpu_ids() == ["0", "GPU-3f2a-11"]


def test_slurm_errors_name_the_variable(clean_env):
  slurm(clean_env, 0, "node[01-02]", "2(x2)", 4)
  clean_env.delenv("SLURM_STEP_NODELIST")
  with pytest.raises(mtl_dist.ConfigError, match="SLURM_STEP_NODELIST"):
    cluster_lib.resolve("slurm")
  slurm(clean_env, 9, "node[01-02]", "2(x2)", 4)
  with pytest.raises(mtl_dist.ConfigError, match="SLURM_PROCID=9"):
    cluster_lib.resolve("slurm")
  slurm(clean_env, 0, "node[01-02", "2(x2)", 4)
  with pytest.raises(mtl_dist.ConfigError, match="SLURM environment"):
    cluster_lib.resolve("slurm")


def test_detect(clean_env):
  assert cluster_lib.detect() is None
  clean_env.setenv("SLURM_STEP_NUM_TASKS", "1")
  assert cluster_lib.detect() is None
  clean_env.setenv("SLURM_STEP_NUM_TASKS", "2")
  assert cluster_lib.detect() == "slurm"
  clean_env.setenv("TF_CONFIG", local_cluster.tf_config([1111, 2222], 1))
  assert cluster_lib.detect() == "tf_config"  # TF_CONFIG comes first.
  clean_env.setenv("TF_CONFIG", local_cluster.tf_config([1111], 0))
  assert cluster_lib.detect() == "slurm"  # One task: not a cluster.


def test_tf_config(clean_env):
  clean_env.setenv("TF_CONFIG", local_cluster.tf_config([1111, 2222], 1))
  resolver = cluster_lib.resolve(None)
  assert resolver.cluster_spec().as_dict() == {
      "worker": ["localhost:1111", "localhost:2222"]}
  assert (resolver.task_type, resolver.task_id) == ("worker", 1)


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "TF_CONFIG is not JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "expected"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]}}), "'task' must name"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": "worker"}),
     "'task' must name"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                 "task": {"type": "worker", "index": "x"}}),
     "'task' must name"),
    ("", "TF_CONFIG is not set"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                 "task": {"type": "worker", "index": 2}}),
     "task worker:2 is not in the cluster"),
])
def test_bad_tf_config(clean_env, tf_config, message):
  clean_env.setenv("TF_CONFIG", tf_config)
  with pytest.raises(mtl_dist.ConfigError, match=message):
    cluster_lib.resolve("tf_config")


def test_no_cluster_is_a_config_error(clean_env):
  with pytest.raises(mtl_dist.ConfigError, match="names no cluster"):
    cluster_lib.resolve(None)


@pytest.mark.parametrize("fields, message", [
    (dict(strategy="mirrored", cluster="slurm"), "--cluster applies to multi"),
    (dict(strategy="one_device", collective_timeout=5.0),
     "--collective_timeout applies"),
    (dict(cluster="yarn"), "--cluster=yarn: must be one of"),
    (dict(collective="mpi"), "--collective=mpi: must be one of"),
    (dict(collective_timeout=0.0), "must be positive"),
    (dict(port_base=70000), "--port_base=70000"),
    (dict(cluster="tf_config", port_base=9000), "--port_base applies to "
     "--cluster=slurm"),
])
def test_multi_worker_flags_are_checked(fields, message):
  config = mtl_dist.TrainConfig(model_dir="/tmp/unused", **fields)
  with pytest.raises(mtl_dist.ConfigError, match=message):
    config.validate()


def test_multi_worker_flags_refused_when_no_cluster(clean_env):
  config = mtl_dist.TrainConfig(model_dir="/tmp/unused", collective="ring")
  config.validate()  # --strategy=auto might find a cluster ...
  with pytest.raises(mtl_dist.ConfigError, match="--collective applies"):
    config.check_single_process()  # ... and refuses once it has not.


def test_several_cpu_devices_per_cpu_worker_are_refused(clean_env):
  clean_env.setenv("TF_CONFIG", local_cluster.tf_config([1111, 2222], 0))
  with pytest.raises(mtl_dist.ConfigError, match="one replica per worker"):
    mtl_dist.create_strategy("multi_worker", 2)


def test_local_cluster_stops_the_others_when_one_fails(capsys, tmp_path):
  # Worker 1 fails once worker 0 has started (so it has printed its line,
  # however slowly it starts); worker 0 would run for an hour if not stopped.
  flag = tmp_path / "worker_0_started"
  program = ("import json, os, pathlib, sys, time\n"
             "index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
             "print('started', flush=True)\n"
             f"flag = pathlib.Path({str(flag)!r})\n"
             "if index == 1:\n"
             "  while not flag.exists(): time.sleep(0.05)\n"
             "  sys.exit(3)\n"
             "flag.touch()\n"
             "time.sleep(3600)\n")
  cluster = local_cluster.LocalCluster([sys.executable, "-c", program],
                                       num_workers=2, grace_seconds=5)
  status = []
  waiter = threading.Thread(target=lambda: status.append(cluster.wait()),
                            daemon=True)
  try:
    cluster.start()
    waiter.start()
    # Two Python start-ups (no TensorFlow) and the 5-s grace period at most.
    wait_until(lambda: not waiter.is_alive(),
               "mtl-local-cluster stopping worker 0", 0.5, fixed_seconds=5)
  finally:
    cluster.stop(signal.SIGKILL)
  assert status == [3]
  out = capsys.readouterr().out
  assert "[worker 0] started" in out and "[worker 1] started" in out
  assert "worker 1 failed with status 3; stopping the other workers" in out


def test_local_cluster_gives_each_worker_its_tf_config(capsys):
  program = ("import json, os\n"
             "spec = json.loads(os.environ['TF_CONFIG'])\n"
             "print(spec['task']['index'],\n"
             "      ' '.join(spec['cluster']['worker']))")
  cluster = local_cluster.LocalCluster([sys.executable, "-c", program],
                                       num_workers=3, grace_seconds=5)
  cluster.start()
  assert cluster.wait() == 0
  lines = sorted(line for line in capsys.readouterr().out.splitlines()
                 if line.startswith("[worker"))
  addresses = {line.split(" ", 3)[3] for line in lines}
  assert len(addresses) == 1  # Every worker sees the same cluster ...
  ports = [a.split(":")[1] for a in addresses.pop().split()]
  assert len(set(ports)) == 3  # ... of three distinct ports,
  assert [line.split()[2] for line in lines] == ["0", "1", "2"]  # own index.


def test_local_cluster_splits_the_hosts_gpus(clean_env):
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
  assert local_cluster.gpu_shares(2) == ["0,1", "2,3"]
  with pytest.raises(ValueError, match="do not split evenly"):
    local_cluster.gpu_shares(3)
  clean_env.setenv("CUDA_VISIBLE_DEVICES", "")
  assert local_cluster.gpu_shares(2) is None
