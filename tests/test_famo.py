"""FAMO (`--weighting=famo`): weights z_i / (c D_i) from task logits that take
an Adam step on the losses' fall over each update; checked against a NumPy
reference of the paper's update (as LibMTL's `FAMO.py` and the official
`famo.py` implement it), its objective's gradient, closed forms on 2 tasks,
degenerate losses, skipped steps and two real training steps."""

from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import weightings
from mtl_dist.methods.weightings import base
from mtl_dist.methods.weightings import famo

EPS = 1e-8  # LibMTL's and the official 1e-8 added to L - min_losses.


class Reference:
  """FAMO in float64 NumPy, written from Liu et al. 2023, Alg. 1, with
  LibMTL's `FAMO.backward` / `update_w` and `torch.optim.Adam` (L2 weight
  decay added to the gradient; betas (0.9, 0.999), eps 1e-8)."""

  def __init__(self, num_tasks, lr=0.025, gamma=1e-3):
    self.xi = np.zeros(num_tasks)
    self.m = np.zeros(num_tasks)
    self.v = np.zeros(num_tasks)
    self.t = 0
    self.lr, self.gamma = lr, gamma

  def z(self):
    e = np.exp(self.xi - self.xi.max())
    return e / e.sum()

  def weights(self, losses):
    d = np.asarray(losses, np.float64) + EPS  # min_losses = 0.
    c = (self.z() / d).sum()
    return self.z() / (c * d)

  def update(self, losses, updated):
    delta = (np.log(np.asarray(losses, np.float64) + EPS) -
             np.log(np.asarray(updated, np.float64) + EPS))
    z = self.z()
    jacobian = np.diag(z) - np.outer(z, z)  # d softmax(xi) / d xi.
    g = jacobian.T @ delta + self.gamma * self.xi
    self.t += 1
    self.m = 0.9 * self.m + 0.1 * g
    self.v = 0.999 * self.v + 0.001 * g * g
    m_hat = self.m / (1 - 0.9**self.t)
    v_hat = self.v / (1 - 0.999**self.t)
    self.xi = self.xi - self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def _sequence(rng, num_tasks, steps):
  """Losses of `steps` steps and the same batches' losses after each."""
  losses = rng.uniform(0.1, 3.0, size=(steps, num_tasks))
  updated = losses * rng.uniform(0.6, 1.1, size=(steps, num_tasks))
  return losses, updated


@pytest.mark.parametrize("num_tasks,seed,options", [
    (3, 0, {}), (4, 1, {"lr": 0.1}), (5, 2, {"lr": 0.5, "gamma": 0.1})])
def test_a_sequence_of_steps_matches_the_reference(num_tasks, seed, options):
  rng = np.random.default_rng(seed)
  losses, updated = _sequence(rng, num_tasks, 5)
  reference = Reference(num_tasks, **options)
  state = None
  for k in range(5):
    weights, state = mtl_dist.loss_weights(
        "famo", losses[k], step=k, state=state, updated_losses=updated[k],
        **options)
    np.testing.assert_allclose(weights, reference.weights(losses[k]),
                               rtol=2e-5)
    reference.update(losses[k], updated[k])
    np.testing.assert_allclose(state["logits"], reference.xi, rtol=1e-4,
                               atol=2e-5)  # float32 against float64.
    np.testing.assert_allclose(state["adam_moments"],
                               np.stack([reference.m, reference.v]),
                               rtol=1e-4, atol=1e-9)
    assert state["updates"] == k + 1
  # The logits moved: later weights are not those of logits zero.
  assert np.abs(state["logits"]).max() > 0.05


def test_weights_are_the_objectives_gradient():
  """The paper's objective sum_i z_i log(L_i - m_i + eps) / c, c held
  constant (LibMTL `c = (z / D).sum().detach()`), differentiated by TF."""
  rng = np.random.default_rng(3)
  for _ in range(4):
    logits = tf.constant(rng.normal(size=4), tf.float32)
    losses = tf.constant(rng.uniform(0.01, 5.0, size=4), tf.float32)
    with tf.GradientTape() as tape:
      tape.watch(losses)
      z = tf.nn.softmax(logits)
      d = losses - 0.0 + EPS
      c = tf.stop_gradient(tf.reduce_sum(z / d))
      objective = tf.reduce_sum(z * tf.math.log(d) / c)
    np.testing.assert_allclose(famo.famo_weights(logits, losses),
                               tape.gradient(objective, losses), rtol=1e-5)


def test_two_task_closed_forms():
  # Logits 0: z = (1/2, 1/2),
  # w_1 = (1/L_1) / (1/L_1 + 1/L_2) = L_2 / (L_1 + L_2).
  weights, state = mtl_dist.loss_weights("famo", [1.0, 3.0],
                                         updated_losses=[0.5, 2.7])
  np.testing.assert_allclose(weights, [0.75, 0.25], rtol=1e-6)
  # First Adam step from 0: m_hat = g, v_hat = g^2, so xi = -lr sign(g),
  # g = J^T delta = (d_1 - d_2) / 4 * (1, -1): the task whose loss fell more
  # (task 0: log 2 > log(3 / 2.7)) loses weight.
  np.testing.assert_allclose(state["logits"], [-0.025, 0.025], rtol=1e-5)
  # Equal falls: delta . (1, -1) = 0, g = 0, nothing moves.
  _, state = mtl_dist.loss_weights("famo", [1.0, 3.0],
                                   updated_losses=[0.5, 1.5])
  np.testing.assert_allclose(state["logits"], [0.0, 0.0], atol=1e-7)


def test_properties():
  rng = np.random.default_rng(4)
  losses, updated = _sequence(rng, 4, 1)
  logits = tf.constant(rng.normal(size=4), tf.float32)
  weights = famo.famo_weights(logits, losses[0]).numpy()
  np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
  assert (weights > 0).all()
  # Task order: permuting the tasks permutes the weights and the update.
  order = [2, 0, 3, 1]
  np.testing.assert_allclose(
      famo.famo_weights(tf.gather(logits, order), losses[0][order]),
      weights[order], rtol=1e-6)
  gradient = famo.famo_logit_gradient(logits, losses[0], updated[0]).numpy()
  np.testing.assert_allclose(
      famo.famo_logit_gradient(tf.gather(logits, order), losses[0][order],
                               updated[0][order]), gradient[order],
      rtol=1e-5, atol=1e-8)
  # Loss scale: weights and update ignore a common scale of the losses.
  np.testing.assert_allclose(famo.famo_weights(logits, 1e3 * losses[0]),
                             weights, rtol=1e-5)
  np.testing.assert_allclose(
      famo.famo_logit_gradient(logits, 1e3 * losses[0], 1e3 * updated[0]),
      gradient, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("losses,updated", [
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
    ([0.0, 1.0, 2.0], [0.0, 0.0, 5.0]),
    ([2.0, 2.0, 2.0], [2.0, 2.0, 2.0]),
    ([1e-6, 1.0, 1e6], [1e-7, 2.0, 1e5]),
    ([1e6, 1e6, 1e-6], [0.0, 1e6, 1e6]),
])
def test_degenerate_losses_stay_finite(losses, updated):
  state = None
  for k in range(4):
    weights, state = mtl_dist.loss_weights("famo", losses, step=k,
                                           state=state,
                                           updated_losses=updated)
    assert np.isfinite(weights).all() and weights.numpy().min() >= 0
    np.testing.assert_allclose(weights.numpy().sum(), 1.0, rtol=1e-5)
    assert all(np.isfinite(v).all() for v in state.values())
    assert state["updates"] == k + 1
  if len(set(losses)) == 1:  # All equal: equal weights.
    np.testing.assert_allclose(weights, [1 / 3] * 3, rtol=1e-5)


def test_a_zero_or_negative_loss_gets_no_weight():
  """Our guard (module doc, (3)): with eps alone a zero loss (a task with no
  labelled example in the batch) would take weight ~1 and its gradient is
  zero; it gets 0 and the others the reference's weights among themselves."""
  weights, _ = mtl_dist.loss_weights("famo", [0.0, 1.0, 3.0],
                                     updated_losses=[0.0, 0.9, 2.0])
  np.testing.assert_allclose(weights, [0.0, 0.75, 0.25], rtol=1e-6)
  weights, state = mtl_dist.loss_weights("famo", [-1.0, 1.0],
                                         updated_losses=[-2.0, 0.5])
  np.testing.assert_allclose(weights, [0.0, 1.0])
  assert all(np.isfinite(v).all() for v in state.values())
  # All zero: the reference's weights, z.
  weights, _ = mtl_dist.loss_weights("famo", [0.0, 0.0],
                                     updated_losses=[0.0, 0.0])
  np.testing.assert_allclose(weights, [0.5, 0.5], rtol=1e-6)


class _Task:
  weight = 1.0
  kind = base.REGRESSION


def _stepped(losses, updated):
  _, state = mtl_dist.loss_weights("famo", losses,
                                   updated_losses=updated)
  return state


def test_a_skipped_or_non_finite_step_changes_no_state():
  state = _stepped([1.0, 2.0, 3.0], [0.5, 1.9, 3.1])
  for losses, updated in [([np.nan, 2.0, 3.0], [0.5, 1.9, 3.1]),
                          ([1.0, 2.0, 3.0], [0.5, np.inf, 3.1])]:
    _, after = mtl_dist.loss_weights("famo", losses, step=1, state=state,
                                     updated_losses=updated)
    for key, value in state.items():
      np.testing.assert_array_equal(after[key], value)
  # A step the trainer skipped (applied=False) changes nothing either.
  weighting = weightings.create("famo", [_Task()] * 3)
  for name, value in state.items():
    getattr(weighting, name).assign(value)
  weighting.update(tf.constant([1.0, 2.0, 3.0]), tf.constant(False),
                   tf.constant([0.1, 1.0, 3.0]))
  for name, value in state.items():
    np.testing.assert_array_equal(getattr(weighting, name).numpy(), value)
  weighting.update(tf.constant([1.0, 2.0, 3.0]), tf.constant(True),
                   tf.constant([0.1, 1.0, 3.0]))
  assert weighting.updates.numpy() == 2


def test_api_checks():
  with pytest.raises(ValueError, match="no option bogus"):
    mtl_dist.loss_weights("famo", [1.0, 2.0], updated_losses=[1.0, 2.0],
                          bogus=1)
  with pytest.raises(ValueError, match="updated_losses"):
    mtl_dist.loss_weights("famo", [1.0, 2.0])
  assert famo.FAMO.needs_losses and famo.FAMO.needs_updated_losses
  assert {o.name: o.default for o in famo.FAMO.options} == {
      "lr": 0.025, "gamma": 1e-3}  # LibMTL config.py FAMO_w_lr, FAMO_w_gamma.


def test_training_steps_use_the_losses_after_each_update(build_trainer,
                                                         shapes_arrays):
  """Through the joint step: the losses after the update are the batch's
  losses with the updated model, and the model moves by sum_i w_i grad L_i."""
  features, labels = shapes_arrays
  features = features[:64]  # One global batch: each step sees all of it.
  labels = {k: v[:64] for k, v in labels.items()}
  trainer, iterators, _, _ = build_trainer(
      1, "joint", ("shape", "x", "y"), weighting="famo", optimizer="sgd",
      learning_rate=0.1, global_batch_size=64, arrays=(features, labels),
      method_options={"famo_lr": 0.1})
  variables = trainer.model.trainable_variables
  reference = Reference(3, lr=0.1)
  for _ in range(3):
    losses, gradients = whole_batch_task_gradients(trainer, features, labels,
                                                   variables)
    weights = reference.weights(losses)
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
    after, _ = whole_batch_task_gradients(trainer, features, labels, [])
    reference.update(losses, after)
    np.testing.assert_allclose(trainer.weighting.logits.numpy(), reference.xi,
                               rtol=1e-3, atol=1e-5)
