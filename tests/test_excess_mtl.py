"""ExcessMTL (`--weighting=excess_mtl`): weights lambda_i exp(eta e_i / e_i(0))
renormalised to T, e_i the AdaGrad-scaled squared norm of task i's gradient
at the last shared layer; checked against a NumPy reference of LibMTL's
`ExcessMTL.py` over step sequences, closed forms, per-task scale invariance,
degenerate gradients, skipped steps and real training steps."""

from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import weightings
from mtl_dist.methods.weightings import base
from mtl_dist.methods.weightings import excess_mtl


class Reference:
  """LibMTL `ExcessMTL.backward` (commit 4336804; the same as the official
  yifei-he/ExcessMTL) in float64 NumPy, one call per step."""

  def __init__(self, num_tasks, robust_step_size=1e-2):
    self.loss_weight = np.ones(num_tasks)
    self.grad_sum = None
    self.first = True
    self.initial_w = None
    self.eta = robust_step_size

  def backward(self, grads):
    grads = np.asarray(grads, np.float64)
    if self.grad_sum is None:
      self.grad_sum = np.zeros_like(grads)
    w = np.zeros(len(grads))
    for i in range(len(grads)):
      self.grad_sum[i] += grads[i]**2
      h_i = np.sqrt(self.grad_sum[i] + 1e-7)
      w[i] = (grads[i] * (1 / h_i)) @ grads[i]
    if self.first:
      self.initial_w = w
      self.first = False
    else:
      w = w / self.initial_w
      self.loss_weight = self.loss_weight * np.exp(w * self.eta)
      self.loss_weight = (self.loss_weight / self.loss_weight.sum() *
                          len(grads))


def _run(gradients, **options):
  """The weights each step used and the state after the last."""
  state, used = None, []
  for k, g in enumerate(gradients):
    weights, state = mtl_dist.loss_weights(
        "excess_mtl", np.ones(len(g)), step=k, state=state, task_gradients=g,
        **options)
    used.append(weights.numpy())
  return used, state


@pytest.mark.parametrize("num_tasks,seed,eta", [(3, 0, 1e-2), (4, 1, 0.5),
                                               (5, 2, 2.0)])
def test_a_sequence_of_steps_matches_the_reference(num_tasks, seed, eta):
  rng = np.random.default_rng(seed)
  # Task scales 10^[-2, 2], changing over the steps.
  scales = 10.0**rng.uniform(-2, 2, size=(num_tasks, 1))
  gradients = [scales * rng.normal(size=(num_tasks, 7)) *
               rng.uniform(0.3, 2.0, size=(num_tasks, 1)) for _ in range(5)]
  reference = Reference(num_tasks, eta)
  state = None
  for k, g in enumerate(gradients):
    weights, state = mtl_dist.loss_weights(
        "excess_mtl", rng.uniform(0.5, 2, num_tasks), step=k, state=state,
        task_gradients=g, robust_step_size=eta)
    # One step's lag: step k uses the weights after steps 0..k-1.
    np.testing.assert_allclose(weights, reference.loss_weight, rtol=1e-5)
    reference.backward(g)
    np.testing.assert_allclose(state["loss_weight"], reference.loss_weight,
                               rtol=1e-5)
    np.testing.assert_allclose(state["gradient_sums"], reference.grad_sum,
                               rtol=1e-5)
    np.testing.assert_allclose(state["initial_scores"], reference.initial_w,
                               rtol=1e-5)
  assert np.abs(state["loss_weight"] - 1).max() > 1e-3  # They moved.


def test_closed_forms():
  # Step 0: e_i = |g_i|^2 / |g_i| = |g_i| (one non-zero entry, eps aside),
  # recorded as e_i(0); no weight moves.
  g0 = np.array([[3.0, 0.0], [0.0, 0.5]])
  weights, state = mtl_dist.loss_weights("excess_mtl", [1.0, 1.0],
                                         task_gradients=g0,
                                         robust_step_size=1.0)
  np.testing.assert_allclose(weights, [1.0, 1.0])
  np.testing.assert_allclose(state["initial_scores"], [3.0, 0.5], rtol=1e-6)
  np.testing.assert_allclose(state["loss_weight"], [1.0, 1.0])
  # Step 1, the same gradients: S_i = 2 g^2, e_i = |g_i| / sqrt 2, ratio
  # 1 / sqrt 2 for both: equal exponents, weights stay 1.
  _, state = mtl_dist.loss_weights("excess_mtl", [1.0, 1.0], step=1,
                                   state=state, task_gradients=g0,
                                   robust_step_size=1.0)
  np.testing.assert_allclose(state["loss_weight"], [1.0, 1.0], rtol=1e-6)
  # Task 0's gradient doubles: S_0 = 9 + 9 + 36, e_0 = 36 / sqrt 54, ratio
  # 12 / sqrt 54; task 1: S_1 = 3 / 4, e_1 = (1/4) / sqrt(3/4), ratio
  # 1 / sqrt 3; lambda = 2 softmax(r) from equal weights.
  g1 = np.array([[6.0, 0.0], [0.0, 0.5]])
  _, state = mtl_dist.loss_weights("excess_mtl", [1.0, 1.0], step=2,
                                   state=state, task_gradients=g1,
                                   robust_step_size=1.0)
  r = np.array([12 / np.sqrt(54), 1 / np.sqrt(3)])
  np.testing.assert_allclose(state["loss_weight"],
                             2 * np.exp(r) / np.exp(r).sum(), rtol=1e-5)


def test_properties():
  rng = np.random.default_rng(5)
  gradients = [rng.normal(size=(4, 6)) for _ in range(4)]
  used, state = _run(gradients, robust_step_size=0.5)
  np.testing.assert_allclose(state["loss_weight"].sum(), 4.0, rtol=1e-6)
  assert (state["loss_weight"] > 0).all()
  # Task order: permuting the tasks permutes the weights.
  order = [3, 1, 0, 2]
  _, permuted = _run([g[order] for g in gradients], robust_step_size=0.5)
  np.testing.assert_allclose(permuted["loss_weight"],
                             state["loss_weight"][order], rtol=1e-5)
  # A task's gradient scale (the same at every step) does not matter:
  # e_i / e_i(0) is invariant to it, the point of the normalisation.
  scale = np.array([[0.1], [1.0], [1e3], [10.0]])  # e_i >> eps.
  _, scaled = _run([scale * g for g in gradients], robust_step_size=0.5)
  np.testing.assert_allclose(scaled["loss_weight"], state["loss_weight"],
                             rtol=1e-3)


@pytest.mark.parametrize("case", [
    "zero", "zero_row", "duplicated", "opposite", "rank_deficient", "scales"])
def test_degenerate_gradients_stay_finite(case):
  rng = np.random.default_rng(6)
  g = rng.normal(size=(3, 5))
  if case == "zero":
    g = np.zeros((3, 5))
  elif case == "zero_row":
    g[1] = 0.0
  elif case == "duplicated":
    g[2] = g[0]
  elif case == "opposite":
    g[1] = -g[0]
  elif case == "rank_deficient":
    g = np.outer([1.0, -2.0, 0.5], rng.normal(size=5))
  else:
    g = g * np.array([[1e-6], [1.0], [1e6]])
  used, state = _run([g, g * 2.0, g, g * 0.5], robust_step_size=1.0)
  for weights in used + [state["loss_weight"]]:
    assert np.isfinite(weights).all() and (weights >= 0).all()
    np.testing.assert_allclose(np.sum(weights), 3.0, rtol=1e-5)
  assert all(np.isfinite(v).all() for v in state.values())
  if case == "zero":  # Nothing recorded, nothing moves.
    np.testing.assert_allclose(state["loss_weight"], [1.0] * 3)
    assert not state["has_initial"].any()
  if case == "zero_row":  # Task 1 keeps exponent 0, the others grow.
    assert state["has_initial"].tolist() == [True, False, True]
    assert state["loss_weight"][1] < 1.0


def test_a_late_first_gradient_is_recorded_then():
  g = np.array([[1.0, 2.0], [0.0, 0.0]])
  _, state = _run([g, g + [[0.0, 0.0], [3.0, 0.0]]])
  assert state["has_initial"].tolist() == [True, True]
  np.testing.assert_allclose(state["initial_scores"][1], 3.0, rtol=1e-6)


class _Task:
  weight = 1.0
  kind = base.CLASSIFICATION


def test_a_skipped_or_non_finite_step_changes_no_state():
  rng = np.random.default_rng(7)
  _, state = _run([rng.normal(size=(3, 4)) for _ in range(2)],
                  robust_step_size=1.0)
  bad = rng.normal(size=(3, 4))
  bad[1, 2] = np.nan
  _, after = mtl_dist.loss_weights("excess_mtl", [1.0, 1.0, 1.0], step=2,
                                   state=state, task_gradients=bad,
                                   robust_step_size=1.0)
  for key, value in state.items():
    np.testing.assert_array_equal(after[key], value)
  # A step the trainer skipped (applied=False) changes nothing either.
  weighting = weightings.create("excess_mtl", [_Task()] * 3,
                                robust_step_size=1.0)
  for name, value in state.items():
    getattr(weighting, name).assign(value)
  good = tf.constant(rng.normal(size=(3, 4)), tf.float32)
  weighting.replica_update(good, tf.ones([3]), tf.ones([3]),
                           tf.constant(False))
  for name, value in state.items():
    np.testing.assert_array_equal(getattr(weighting, name).numpy(), value)
  weighting.replica_update(good, tf.ones([3]), tf.ones([3]),
                           tf.constant(True))
  assert not np.array_equal(weighting.loss_weight.numpy(),
                            state["loss_weight"])


def test_api_checks():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.loss_weights("excess_mtl", [1.0, 2.0],
                          task_gradients=np.ones((2, 3)), bogus=1)
  with pytest.raises(ValueError, match="task_gradients"):
    mtl_dist.loss_weights("excess_mtl", [1.0, 2.0])
  # LibMTL config.py and the official config.py: --robust_step_size 1e-2.
  assert {o.name: o.default for o in excess_mtl.ExcessMTL.options} == {
      "robust_step_size": 1e-2}


def test_training_steps_accumulate_the_gradients_at_the_last_shared_layer(
    build_trainer, shapes_arrays):
  features, labels = shapes_arrays
  features = features[:64]  # One global batch: each step sees all of it.
  labels = {k: v[:64] for k, v in labels.items()}
  trainer, iterators, _, _ = build_trainer(
      1, "joint", ("shape", "x", "y"), weighting="excess_mtl",
      optimizer="sgd", learning_rate=0.1, global_batch_size=64,
      arrays=(features, labels),
      method_options={"excess_mtl_robust_step_size": 5.0})
  variables = trainer.model.trainable_variables
  kernels = tf.nest.flatten(trainer.model.last_shared_kernel())
  reference = Reference(3, 5.0)
  for _ in range(3):
    _, at_kernel = whole_batch_task_gradients(trainer, features, labels,
                                              kernels)
    _, gradients = whole_batch_task_gradients(trainer, features, labels,
                                              variables)
    weights = reference.loss_weight
    want = [v.numpy() - 0.1 * sum(w * g[i] for w, g in zip(weights,
                                                            gradients))
            for i, v in enumerate(variables)]
    result = trainer.train(iterators, 1)
    np.testing.assert_allclose(
        [result.step_metrics[f"{t}/weight"] for t in ("shape", "x", "y")],
        weights, rtol=1e-4)
    for variable, expected in zip(variables, want):
      np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4,
                                 atol=1e-6)
    reference.backward(np.stack([np.concatenate([x.ravel() for x in g])
                                 for g in at_kernel]))
  np.testing.assert_allclose(trainer.weighting.gradient_sums.numpy(),
                             reference.grad_sum, rtol=1e-3, atol=1e-9)
  np.testing.assert_allclose(trainer.weighting.loss_weight.numpy(),
                             reference.loss_weight, rtol=1e-3)
  assert np.abs(reference.loss_weight - 1).max() > 1e-3
