"""Every architecture: its contract, replicas, ownership, resume and export.

The properties the steps rely on are checked on each architecture itself
(which variables each task's loss reaches, the representation of
`--rep_grad`), then end to end: 1, 2 and 4 replicas give one device's
weights in both modes; an alternate step leaves other tasks' variables and
optimizer slots bit for bit; a restored checkpoint continues bit for bit;
every export serves each task.
"""

import json
import os
import re
import subprocess
import sys

import architecture_runs
from conftest import event_tags
from conftest import make_strategy
from conftest import snapshot
from conftest import time_limit
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from launch import local_cluster
import mtl_dist
from mtl_dist.data import shapes
from mtl_dist.model import architectures
from mtl_dist.model import settings as model_settings
from mtl_dist.run import export as export_lib

ARCHITECTURES = model_settings.ARCHITECTURES
TASKS = ("shape", "x", "y")
# Small settings that still exercise each architecture's parts: two PLE
# levels with private experts, DSelect-k with a number of experts that is
# not a power of two (its extra regularizer).
OPTIONS = {
    "mmoe": {"num_experts": 3},
    "cgc": {"num_shared_experts": 2, "num_task_experts": 1},
    "ple": {"num_shared_experts": 1, "num_task_experts": 1, "num_levels": 2},
    "dselect_k": {"num_experts": 3, "num_selected_experts": 2},
}
# Where another task's loss reaches a task's own variables (through PLE's
# shared gates and cross-stitch units).
CROSS_TASK = ("ple", "cross_stitch")
# Joint mode: each architecture trains with an aggregator and a weighting;
# together they cover every method, both ways of summing (the optimizer's
# all-reduce and an aggregator's), GradNorm on three kinds of W and
# --rep_grad on every architecture that has a representation.
JOINT_METHODS = {
    "hps": ("imtl_g", "rlw", False),
    "mmoe": ("mgda", "gradnorm", True),
    "cgc": ("sum", "uncertainty", False),
    "ple": ("pcgrad", "dwa", False),
    "cross_stitch": ("sum", "gradnorm", False),
    "dselect_k": ("imtl_g", "static", True),
    "mtan": ("cagrad", "static", False),
}
# Tasks of the trained tests (two keep their traces short).
TRAINED = ("shape", "x")


def _specs():
  specs = {task.name: task for task in shapes.TASKS}
  return [specs[name] for name in TASKS]


def _model(architecture: str, trunk: str = "mlp", **kwargs):
  return architectures.build(
      _specs(), (32, 32, 1), model_settings.ArchitectureConfig(
          architecture=architecture, **OPTIONS.get(architecture, {})),
      trunk=trunk, trunk_width=8, trunk_depth=2, **kwargs)


def _loss(task, labels, outputs):
  return tf.reduce_mean(task.per_example_loss(labels[task.name],
                                              outputs[task.name]))


def _nonzero(gradients) -> bool:
  return any(np.any(np.asarray(g) != 0) for g in gradients)


@pytest.mark.parametrize("trunk", ["mlp", "conv"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_variables_split_and_each_loss_reaches_what_it_should(
    shapes_arrays, architecture, trunk):
  model = _model(architecture, trunk)
  shared = model.shared_variables
  own = {name: model.task_variables(name) for name in TASKS}
  ids = [id(v) for v in shared] + [id(v) for vs in own.values() for v in vs]
  assert len(ids) == len(set(ids)), "a variable is in two groups"
  assert set(ids) == {id(v) for v in model.trainable_variables}
  assert shared and all(own.values())

  features, labels = shapes_arrays
  features = tf.constant(features[:16])
  labels = {k: tf.constant(v[:16]) for k, v in labels.items()}
  zero = tf.UnconnectedGradients.ZERO
  with tf.GradientTape(persistent=True) as tape:
    forward = model.forward(features, training=True)
    losses = {task.name: _loss(task, labels, forward.outputs)
              for task in _specs()}
  for name in TASKS:
    # Every shared variable and the task's own are trained by its loss...
    assert all(_nonzero([g]) for g in tape.gradient(
        losses[name], shared + own[name], unconnected_gradients=zero))
    # ...and other tasks' losses reach its own only through shared mixing.
    for other in TASKS:
      if other != name:
        reached = _nonzero(tape.gradient(losses[other], own[name],
                                         unconnected_gradients=zero))
        assert reached == (architecture in CROSS_TASK), (name, other)

  assert model.has_representation == (
      architecture in model_settings.WITH_REPRESENTATION)
  if model.has_representation:
    # --rep_grad's premise: the shared variables reach every loss only
    # through the representation, so backpropagating dL/dz gives dL/dW.
    for name in TASKS:
      direct = tape.gradient(losses[name], shared, unconnected_gradients=zero)
      through = tape.gradient(
          forward.representation, shared, unconnected_gradients=zero,
          output_gradients=tape.gradient(losses[name],
                                         forward.representation))
      for d, t in zip(direct, through):
        np.testing.assert_allclose(d, t, rtol=1e-4, atol=1e-6)
  else:
    with pytest.raises(ValueError, match="no representation"):
      model.call_with_representation(features)

  outputs = model(features, training=False)
  for name in TASKS:
    np.testing.assert_allclose(model.call_task(features, name), outputs[name],
                               rtol=1e-5, atol=1e-6)
  assert tuple(forward.diagnostics) == model.diagnostic_names()


@pytest.mark.parametrize("architecture", ["mmoe", "cgc", "ple", "dselect_k"])
def test_gate_diagnostics_are_each_tasks_mean_weights(shapes_arrays,
                                                      architecture):
  model = _model(architecture)
  features = tf.constant(shapes_arrays[0][:16])
  diagnostics = model.forward(features).diagnostics
  for name in TASKS:
    gates = [value for key, value in diagnostics.items()
             if key.startswith(f"{name}/gate/")]
    levels = OPTIONS[architecture].get("num_levels", 1)
    total = float(tf.add_n(gates))
    if architecture == "dselect_k":
      # 3 experts in 2 bits: the fourth code holds the rest of the weight
      # until the regularizer moves it (see the test below).
      assert 0.5 < total <= 1.0
    else:  # Per level a task's gate weights sum to one on every example.
      np.testing.assert_allclose(total, levels, rtol=1e-5)
    assert all(0.0 <= float(g) <= 1.0 for g in gates)
  # The first gate, recomputed from its layer.
  first = model.task_gates[0]["shape"](features)
  np.testing.assert_allclose(
      diagnostics[model.diagnostic_names(["shape"])[0]],
      tf.reduce_mean(first[:, 0]), rtol=1e-6)


def test_cross_stitch_units_start_near_the_identity_and_are_logged():
  model = _model("cross_stitch")
  expected = np.full((3, 3), 0.05, np.float32)
  np.fill_diagonal(expected, 0.9)
  for unit in model.units:
    np.testing.assert_allclose(unit.alpha.numpy(), expected)
  diagnostics = model.forward(tf.zeros((2, 32, 32, 1))).diagnostics
  assert float(diagnostics["cross_stitch/unit1/x/shape"]) == pytest.approx(0.05)
  assert float(diagnostics["cross_stitch/unit0/y/y"]) == pytest.approx(0.9)


def test_dselect_k_gate_selects_at_most_k_experts_once_saturated():
  gate = architectures.experts.DSelectKGate(5, 2, gamma=1.0, entropy_reg=0.0)
  features = tf.random.stateless_normal((8, 6), seed=(1, 2))
  gate(features)
  # Saturated bits: each selector picks one expert exactly.
  gate.z_logits.kernel.assign(tf.zeros_like(gate.z_logits.kernel))
  gate.z_logits.bias.assign([5.0, -5.0, -5.0, -5.0, 5.0, -5.0])  # 4 and 2.
  weights = gate(features).numpy()
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(np.count_nonzero(weights, axis=1) <= 2)
  assert np.all(weights[:, [0, 1, 3]] == 0.0)
  # The non-power-of-two term keeps unreachable codes from the weight; with
  # reachable selections it is its minimum, k.
  gate(features, training=True)
  assert float(gate.losses[-1]) == pytest.approx(2.0)


def _smooth_step(x, gamma):
  """The official DSelect-k smooth step, in NumPy."""
  cubic = -2.0 / gamma**3 * x**3 + 3.0 / (2.0 * gamma) * x + 0.5
  return np.where(x <= -gamma / 2, 0.0, np.where(x >= gamma / 2, 1.0, cubic))


@pytest.mark.parametrize("num_experts", [3, 4])
def test_dselect_k_gate_matches_a_numpy_reference(num_experts):
  k, gamma, entropy_reg = 2, 1.5, 0.01
  gate = architectures.experts.DSelectKGate(num_experts, k, gamma=gamma,
                                            entropy_reg=entropy_reg)
  features = tf.random.stateless_normal((6, 5), seed=(3, 4))
  gate(features)
  rng = np.random.default_rng(0)  # Unsaturated bits, distinct logits.
  for variable in gate.trainable_variables:
    variable.assign(rng.normal(0.0, 0.5, variable.shape))
  weights = gate(features, training=True).numpy()
  loss = float(gate.losses[-1])

  x = features.numpy().astype(np.float64)
  # Each expert's binary code, most significant bit first.
  num_bits = int(np.ceil(np.log2(num_experts)))
  codes = np.array([[(i >> (num_bits - 1 - b)) & 1 for b in range(num_bits)]
                    for i in range(num_experts)], bool)
  z = (x @ gate.z_logits.kernel.numpy() + gate.z_logits.bias.numpy())
  z = _smooth_step(z.reshape(-1, k, 1, num_bits), gamma)
  selectors = np.prod(np.where(codes[None, None], z, 1 - z), axis=3)
  logits = x @ gate.w_logits.kernel.numpy() + gate.w_logits.bias.numpy()
  softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  expected = (softmax[:, :, None] * selectors).sum(axis=1)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  # The regularizers, as means over the examples.
  entropy = -(selectors * np.log(selectors + 1e-6)).sum(axis=(1, 2))
  expected_loss = entropy_reg * entropy.mean()
  if num_experts != 2**num_bits:
    expected_loss += (1.0 / selectors.sum(axis=-1)).sum(axis=-1).mean()
  assert loss == pytest.approx(expected_loss, rel=1e-5)


def test_cross_stitch_unit_mixes_rows_into_tasks():
  unit = architectures.cross_stitch.CrossStitchUnit(3)
  alpha = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.5, -0.3, 0.8]],
                   np.float32)
  unit.alpha.assign(alpha)
  activations = [np.full((2, 4), value, np.float32) for value in (1.0, 10.0,
                                                                  100.0)]
  mixed = unit([tf.constant(a) for a in activations])
  for t in range(3):  # Task t takes sum_j alpha[t, j] x_j.
    np.testing.assert_allclose(
        mixed[t], sum(alpha[t, j] * activations[j] for j in range(3)),
        rtol=1e-6)


def test_ple_wiring_follows_the_paper(shapes_arrays):
  model = _model("ple")  # 2 levels, 1 shared and 1 private expert each.
  x = tf.constant(shapes_arrays[0][:8])
  names = model.task_names

  def mix(weights, experts):
    return sum(weights[:, i:i + 1] * tf.cast(e, tf.float32)
               for i, e in enumerate(experts))

  # Level 0: everything reads the input.
  shared0 = [e(x) for e in model.shared_experts[0]]
  own0 = {t: [e(x) for e in model.task_experts[0][t]] for t in names}
  paths = {t: mix(model.task_gates[0][t](x), shared0 + own0[t])
           for t in names}
  # The shared gate, fed by the shared path (the input), mixes every expert.
  shared_path = mix(model.shared_gates[0](x),
                    shared0 + [e for t in names for e in own0[t]])
  # Level 1: shared experts read the shared path, a task's its own path.
  shared1 = [e(shared_path) for e in model.shared_experts[1]]
  for t in names:
    own1 = [e(paths[t]) for e in model.task_experts[1][t]]
    final = mix(model.task_gates[1][t](paths[t]), shared1 + own1)
    np.testing.assert_allclose(model.heads[t](final), model(x)[t],
                               rtol=1e-5, atol=1e-6)


def test_mtan_attention_follows_the_paper(shapes_arrays):
  model = _model("mtan")  # Flatten, Dense, Dense.
  x = tf.constant(shapes_arrays[0][:8])
  flatten, first, second = model.trunk
  s1 = first(flatten(x))
  s2 = second(s1)
  for t in model.task_names:
    a1, a2 = model.attention[t]
    # The first module reads the shared feature alone.
    g1 = tf.nn.relu(tf.matmul(s1, a1.g.kernel) + a1.g.bias)
    f1 = tf.sigmoid(tf.matmul(g1, a1.h.kernel) + a1.h.bias) * s1
    # Later ones read it with the task's previous feature.
    g2 = tf.nn.relu(tf.matmul(tf.concat([s2, f1], -1), a2.g.kernel) +
                    a2.g.bias)
    f2 = tf.sigmoid(tf.matmul(g2, a2.h.kernel) + a2.h.bias) * s2
    np.testing.assert_allclose(model.heads[t](f2), model(x)[t], rtol=1e-5,
                               atol=1e-6)


def _weights(trainer):
  return snapshot(trainer.model.trainable_variables)


def _build(build_trainer, replicas, mode, architecture, **kwargs):
  return build_trainer(replicas, mode, TRAINED, architecture=architecture,
                       architecture_options=OPTIONS.get(architecture),
                       trunk_width=8, trunk_depth=1, global_batch_size=16,
                       **kwargs)


def _assert_same_metrics(replicas_metrics) -> None:
  """Step metrics (task weights, gate weights, ...) on 1, 2 and 4 replicas:
  the same names and values (diagnostics are global-batch means)."""
  reference = replicas_metrics[0]
  for replicas, metrics in zip((2, 4), replicas_metrics[1:]):
    assert sorted(metrics) == sorted(reference)
    for name, value in reference.items():
      assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (
          name, replicas)


def _assert_replicas_equal_one_device(replicas_weights) -> None:
  """Weights after training on 1, 2 and 4 replicas: all equal."""
  reference = replicas_weights[0]
  for replicas, weights in zip((2, 4), replicas_weights[1:]):
    for expected, value in zip(reference, weights):
      np.testing.assert_allclose(value, expected, atol=1e-5, rtol=1e-5,
                                 err_msg=f"{replicas} replicas")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_joint_replicas_equal_one_device(build_trainer, architecture):
  # SGD: Adam divides each gradient by its own size, so where terms cancel
  # to a gradient near its epsilon (1e-7) it turns round-off of the
  # replicas' different summation orders into differences of lr * 1e-3.
  aggregator, weighting, rep_grad = JOINT_METHODS[architecture]
  initial, weights, metrics = None, [], []
  for replicas in (1, 2, 4):
    trainer, iterators, _, _ = _build(
        build_trainer, replicas, "joint", architecture, optimizer="sgd",
        learning_rate=0.1, aggregator=aggregator, weighting=weighting,
        rep_grad=rep_grad, initial_weights=initial)
    initial = initial or trainer.model.get_weights()
    result = trainer.train(iterators, 3)
    assert result.skipped.count == 0
    weights.append(_weights(trainer))
    metrics.append(result.step_metrics)
  _assert_replicas_equal_one_device(weights)
  _assert_same_metrics(metrics)


# The method families whose hooks reach into the architecture, one of each:
# an aggregator that needs the losses and keeps [T, P] state (moco) with a
# weighting that takes gradients at the last shared kernels (excess_mtl);
# sub-batch gradients (modo) with the losses after the update (famo); a
# bargaining solver from the Gram matrix (at the representation, where the
# architecture has one) with a weighting from the global losses (stch).
METHOD_FAMILIES = (("moco", "excess_mtl"), ("modo", "famo"),
                   ("nash_mtl", "stch"))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_method_family_trains_on_the_architecture(build_trainer,
                                                        architecture):
  for aggregator, weighting in METHOD_FAMILIES:
    rep_grad = aggregator == "nash_mtl" and model_settings.ArchitectureConfig(
        architecture=architecture,
        **(OPTIONS.get(architecture) or {})).has_representation
    trainer, iterators, _, _ = build_trainer(
        2, "joint", TRAINED, architecture=architecture,
        architecture_options=OPTIONS.get(architecture), trunk_width=8,
        trunk_depth=1, global_batch_size=24, aggregator=aggregator,
        weighting=weighting, rep_grad=rep_grad,
        method_options={"stch_warmup_steps": 1} if weighting == "stch"
        else {})
    before = _weights(trainer)
    result = trainer.train(iterators, 3)
    assert result.skipped.count == 0, (aggregator, weighting)
    after = _weights(trainer)
    assert all(np.isfinite(w).all() for w in after)
    moved = [not np.allclose(a, b) for a, b in zip(after, before)]
    assert all(moved), (aggregator, weighting, moved)
    assert all(np.isfinite(v.numpy()).all() for v in
               trainer.aggregator.variables + trainer.weighting.variables)


def _optimizer_slots(optimizer, variables):
  """Adam's m and v of each of `variables` in `optimizer`."""
  slots = []
  for variable in variables:
    index = optimizer._index_dict[optimizer._var_key(variable)]  # pylint: disable=protected-access
    slots += [optimizer._momentums[index], optimizer._velocities[index]]  # pylint: disable=protected-access
  return slots


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_alternate_replicas_equal_one_device_other_tasks_stay_put(
    build_trainer, architecture):
  initial, weights, metrics = None, [], []
  for replicas in (1, 2, 4):
    # SGD, as in the joint test; Adam's slots are checked below.
    trainer, iterators, _, _ = _build(
        build_trainer, replicas, "alternate", architecture, optimizer="sgd",
        learning_rate=0.1, initial_weights=initial)
    step_metrics = {}
    initial = initial or trainer.model.get_weights()
    model, optimizers = trainer.model, trainer.optimizers
    for task in TRAINED + TRAINED[:1]:  # Round robin: a step per task.
      others = [t for t in TRAINED if t != task]
      frozen = [v for t in others for v in model.task_variables(t)]
      frozen += [v for t in others for v in optimizers[t].variables]
      before = snapshot(frozen)
      shared_before = snapshot(model.shared_variables)
      own_before = snapshot(model.task_variables(task))
      result = trainer.train(iterators, 1)
      # Each step measures its own task's gates (and every stitch) only.
      assert all(not name.startswith(tuple(f"{t}/" for t in others))
                 for name in result.step_metrics)
      step_metrics.update({f"{task}@{name}": value for name, value in
                           result.step_metrics.items()})
      assert all(np.array_equal(b, a) for b, a in zip(before,
                                                      snapshot(frozen))), (
                                                          task, replicas)
      # The step trains the shared variables and the task's own (each
      # one's gradient is non-zero: see the first test; with SGD a tiny one
      # may leave a variable's float32 value as it was).
      for before_step, variables in ((shared_before, model.shared_variables),
                                     (own_before, model.task_variables(task))):
        assert not all(np.array_equal(b, a) for b, a in zip(
            before_step, snapshot(variables)))
    weights.append(_weights(trainer))
    metrics.append(step_metrics)
  _assert_replicas_equal_one_device(weights)
  _assert_same_metrics(metrics)

  # One Adam for every task: a step leaves other tasks' slots alone.
  trainer, iterators, _, _ = _build(build_trainer, 1, "alternate",
                                    architecture, optimizer="adam",
                                    per_task_optimizer=False)
  model, optimizer = trainer.model, trainer.optimizers["shape"]
  frozen = [v for t in TRAINED[1:] for v in model.task_variables(t)]
  frozen += _optimizer_slots(optimizer, frozen)
  before = snapshot(frozen)
  trained = _optimizer_slots(optimizer,
                             model.trunk_and_head_variables("shape"))
  trained_before = snapshot(trained)
  trainer.train(iterators, 1)  # Step 0 trains "shape".
  assert all(np.array_equal(b, a) for b, a in zip(before, snapshot(frozen)))
  assert not any(np.array_equal(b, a)
                 for b, a in zip(trained_before, snapshot(trained)))


@pytest.mark.parametrize("architecture", ["cgc", "ple", "cross_stitch",
                                          "mtan"])
def test_joint_aggregation_gives_own_variables_the_objectives_gradient(
    build_trainer, shapes_arrays, architecture):
  learning_rate = 0.1
  trainer, iterators, _, _ = _build(build_trainer, 1, "joint", architecture,
                                    aggregator="pcgrad",
                                    learning_rate=learning_rate)
  model = trainer.model
  own = [v for t in TRAINED for v in model.task_variables(t)]
  before = snapshot(own)
  batch = next(iter(mtl_dist.distribute_train(
      make_strategy(1), mtl_dist.source_from_arrays(*shapes_arrays, TRAINED),
      16, seed=7)))
  features, labels = batch
  with tf.GradientTape() as tape:
    outputs = model(features, training=True)
    objective = tf.add_n([_loss(task, labels, outputs)
                          for task in trainer.tasks])
    objective += tf.add_n(model.regularization_losses() or [0.0])
  gradients = tape.gradient(objective, own)
  trainer.train(iterators, 1)
  for b, g, v in zip(before, gradients, own):
    np.testing.assert_allclose(v.numpy(), b - learning_rate * g.numpy(),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["joint", "alternate"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_restored_checkpoint_continues_bit_for_bit(build_trainer, tmp_path,
                                                   architecture, mode):

  def build(initial):
    return _build(build_trainer, 1, mode, architecture, optimizer="adam",
                  learning_rate=0.01, initial_weights=initial)

  whole, iterators, _, _ = build(None)
  initial = whole.model.get_weights()
  whole.train(iterators, 4)
  expected = _weights(whole)

  first, iterators, _, _ = build(initial)
  first.train(iterators, 2)
  path = tf.train.Checkpoint(**first.checkpoint_items()).write(
      str(tmp_path / "ckpt"))
  resumed, iterators, _, _ = build(None)  # Other initial weights.
  tf.train.Checkpoint(**resumed.checkpoint_items()).read(
      path).assert_consumed()
  # The batches the first two steps read (round robin: shape, then x).
  for iterator, used in zip(iterators, [2] if mode == "joint" else [1, 1]):
    for _ in range(used):
      next(iterator)
  resumed.train(iterators, 2)
  for want, got in zip(expected, _weights(resumed)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_export_serves_every_task(tmp_path, shapes_arrays, architecture):
  model = _model(architecture)
  features = tf.constant(shapes_arrays[0][:4])
  expected = model(features, training=False)
  export_dir = str(tmp_path / "export")
  export_lib.export_saved_model(model, _specs(), (32, 32, 1), tf.float32,
                                export_dir)
  loaded = tf.saved_model.load(export_dir)
  assert set(loaded.signatures) == {"serving_default", *TASKS}
  served = loaded.signatures["serving_default"](inputs=features)
  for name in TASKS:
    single = loaded.signatures[name](inputs=features)
    key = "logits" if name == "shape" else "prediction"
    np.testing.assert_allclose(single[key], expected[name], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(served[f"{name}_{key}"], expected[name],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("localhost_cluster")
def test_two_workers_equal_two_mirrored_replicas(tmp_path):
  output = tmp_path / "workers.npz"
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  ports = local_cluster.free_ports(2)
  script = os.path.join(os.path.dirname(__file__), "architecture_runs.py")
  workers = [subprocess.Popen(
      [sys.executable, script, str(output)],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch),
               TF_CONFIG=local_cluster.tf_config(ports, i),
               PYTHONPATH=os.pathsep.join(sys.path)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
  # Generous: two processes trace 14 trainers each on a shared CPU.
  limit = time_limit(28)
  outputs = [worker.communicate(timeout=limit)[0] for worker in workers]
  for worker, text in zip(workers, outputs):
    assert worker.returncode == 0, text[-4000:]
  expected = architecture_runs.train_all(make_strategy(2))
  got = np.load(output)
  assert sorted(got.files) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=1e-5,
                               err_msg=name)



def test_keras3_pieces_train_like_the_built_in_tf_keras_layers():
  # Every piece of every architecture written in Keras 3, both modes, on 2
  # replicas: the same weights as the built-in tf_keras layers.
  expected = architecture_runs.train_all(make_strategy(2))
  got = architecture_runs.train_all(make_strategy(2), keras3=True)
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, atol=1e-6, rtol=1e-6,
                               err_msg=name)

def _records(model_dir: str) -> list[dict]:
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_api_trains_evaluates_and_exports_with_the_users_pieces(tmp_path):
  made = {"experts": 0, "gates": [], "towers": []}

  def expert_fn():
    made["experts"] += 1
    return tf_keras.Sequential([tf_keras.layers.Flatten(),
                                tf_keras.layers.Dense(12, activation="tanh")])

  def gate_fn(num_experts):
    made["gates"].append(num_experts)
    return tf_keras.Sequential([tf_keras.layers.Flatten(),
                                tf_keras.layers.Dense(num_experts)])

  def head_fn(task):
    made["towers"].append(task.name)
    return tf_keras.Sequential([tf_keras.layers.Dense(8, activation="relu"),
                                tf_keras.layers.Dense(task.output_size)])

  model_dir, export_dir = str(tmp_path / "cgc"), str(tmp_path / "export")
  pieces = {"expert_fn": expert_fn, "gate_fn": gate_fn, "head_fn": head_fn}
  summary = mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, architecture="cgc", mode="alternate",
      tasks=["shape", "x"], train_steps=20, steps_per_loop=10, log_every=10,
      eval_every=20, eval_examples=64, strategy="mirrored",
      num_cpu_devices=2, global_batch_size=16, export_dir=export_dir),
                           **pieces)
  # Two shared experts and one of each task's, a gate per task over three;
  # once for training, once for the export at its end.
  assert made == {"experts": 2 * 4, "gates": [3] * 4,
                  "towers": ["shape", "x"] * 2}
  assert summary["step"] == 20 and set(summary["eval"]) == {"shape", "x"}
  assert set(tf.saved_model.load(export_dir).signatures) == {
      "serving_default", "shape", "x"}

  # The gates' mean weights, per logged interval, in both logs.
  train = [r for r in _records(model_dir) if r["split"] == "train"]
  gates = {k: v for k, v in train[-1]["metrics"].items() if "/gate/" in k}
  assert sorted(gates) == sorted(
      f"{task}/gate/{expert}" for task in ("shape", "x")
      for expert in ("shared0", "shared1", "own0"))
  for task in ("shape", "x"):
    assert sum(v for k, v in gates.items()
               if k.startswith(task)) == pytest.approx(1.0, rel=1e-5)
  assert set(gates) <= event_tags(os.path.join(model_dir, "tensorboard",
                                               "train"))

  # Rebuilding the run needs the same pieces.
  with pytest.raises(mtl_dist.ConfigError, match="experts made in Python"):
    mtl_dist.export_run(model_dir, str(tmp_path / "again"),
                        head_fn=head_fn, gate_fn=gate_fn)
  mtl_dist.export_run(model_dir, str(tmp_path / "again"), **pieces)
  evaluated = mtl_dist.evaluate(model_dir, **pieces)
  assert evaluated[-1].metrics == pytest.approx(
      {f"{task}/{name}": value for task, metrics in summary["eval"].items()
       for name, value in metrics.items()}, rel=1e-5)


def test_api_cross_stitch_columns_from_the_user(tmp_path):
  def column_fn():
    return [tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10, activation="relu"),
            tf_keras.layers.Dense(10, activation="relu")]

  model_dir = str(tmp_path / "cross_stitch")
  mtl_dist.train(mtl_dist.TrainConfig(
      model_dir=model_dir, architecture="cross_stitch", tasks=["shape", "x"],
      train_steps=10, steps_per_loop=10, log_every=10, eval_every=10,
      eval_examples=64, train_examples=256, strategy="one_device"),
                 column_fn=column_fn)
  metrics = [r for r in _records(model_dir)
             if r["split"] == "train"][-1]["metrics"]
  # A unit after each of the column's three layers, [2, 2] coefficients.
  stitched = sorted(k for k in metrics if k.startswith("cross_stitch/"))
  assert stitched == sorted(f"cross_stitch/unit{i}/{a}/{b}" for i in range(3)
                            for a in ("shape", "x") for b in ("shape", "x"))
  assert metrics["cross_stitch/unit0/shape/shape"] == pytest.approx(0.9,
                                                                    abs=0.05)


@pytest.mark.parametrize("architecture, pieces, message", [
    ("hps", ["gate_fn"], "gate_fn makes a piece of --architecture=mmoe"),
    ("mmoe", ["trunk_fn"], "trunk_fn makes a piece of --architecture=hps"),
    ("dselect_k", ["gate_fn"], "gate_fn"),
    ("cross_stitch", ["expert_fn"], "expert_fn"),
    ("mmoe", ["expert_fn", "trunk_width"], "--trunk_width=8: describes the "
     "built-in trunk, but the run was given its own (expert_fn)"),
])
def test_api_refuses_pieces_the_architecture_does_not_use(
    tmp_path, architecture, pieces, message):
  layer = lambda *_: tf_keras.layers.Dense(4)  # noqa: E731
  functions = {name: layer for name in pieces if name.endswith("_fn")}
  settings = {"trunk_width": 8} if "trunk_width" in pieces else {}
  model_dir = tmp_path / "run"
  with pytest.raises(mtl_dist.ConfigError, match=re.escape(message)):
    mtl_dist.train(mtl_dist.TrainConfig(
        model_dir=str(model_dir), architecture=architecture,
        strategy="one_device", **settings), **functions)
  assert not model_dir.exists()


def test_launcher_trains_a_gated_architecture_and_exports_it(tmp_path):
  model_dir, export_dir = tmp_path / "run", tmp_path / "export"
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--model_dir={model_dir}",
       "--architecture=dselect_k", "--num_experts=3", "--mode=joint",
       "--tasks=shape,x", "--train_steps=20", "--steps_per_loop=10",
       "--log_every=10", "--eval_every=20", "--eval_examples=64",
       "--trunk_width=8", "--num_cpu_devices=2", f"--export_dir={export_dir}"],
      capture_output=True, text=True, timeout=time_limit(19), check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  assert result.returncode == 0, result.stderr[-3000:]
  spec = json.load(open(model_dir / "model.json"))
  assert spec["architecture"] == {
      "architecture": "dselect_k", "num_experts": 3,
      "num_selected_experts": 2, "dselect_k_gamma": 1.0,
      "dselect_k_entropy_reg": 1e-6}
  assert set(tf.saved_model.load(str(export_dir)).signatures) == {
      "serving_default", "shape", "x"}
  train = [r for r in _records(str(model_dir)) if r["split"] == "train"]
  assert [r["step"] for r in train] == [10, 20]
  assert {f"x/gate/expert{i}" for i in range(3)} <= set(train[-1]["metrics"])


@pytest.mark.parametrize("pieces, message", [
    ("same_expert", "must return new layers"),
    ("none_expert", "expert_fn: got None; a piece must be a Keras"),
    ("bad_column", "column_fn must return"),
    ("mtan_trunk", "trunk_fn must return a Sequential (keras, tf.keras or"),
])
def test_pieces_that_cannot_work_are_refused_in_one_line(tmp_path, pieces,
                                                         message):
  shared = tf_keras.layers.Dense(4)
  architecture, functions = {
      "same_expert": ("cgc", {"expert_fn": lambda: shared}),
      "none_expert": ("mmoe", {"expert_fn": lambda: None}),
      "bad_column": ("cross_stitch", {"column_fn": lambda: "dense"}),
      "mtan_trunk": ("mtan", {"trunk_fn": lambda: tf_keras.layers.Dense(4)}),
  }[pieces]
  model_dir = tmp_path / "run"
  with pytest.raises(mtl_dist.ConfigError) as error:
    mtl_dist.train(mtl_dist.TrainConfig(
        model_dir=str(model_dir), architecture=architecture,
        strategy="one_device"), **functions)
  assert message in str(error.value) and "\n" not in str(error.value)
  assert not model_dir.exists()
