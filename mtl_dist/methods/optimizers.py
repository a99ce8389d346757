"""Optimizers: tf_keras's, with Adam's dense update in one fused kernel.

tf_keras's Adam updates a variable with five separate element-wise ops (two
moment updates, a square root, a division, a subtraction), each a full pass
over the variable; off GPUs it does not compile them (its `jit_compile` is
GPU-only). TensorFlow's `ResourceApplyAdam` kernel does the same update in
one pass. Measured on the benchmark's 3x1024 MLP (3.2M parameters, 2 CPU
cores): 4.4 ms per step for tf_keras's update, 1.7 ms fused, about a
seventh of the whole training step (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import tensorflow as tf
import tf_keras

from mtl_dist import errors
from mtl_dist import typecheck

OptimizerFactory = Callable[[], tf_keras.optimizers.Optimizer]
NAMES = ("adam", "sgd")


class FusedAdam(tf_keras.optimizers.Adam):
  """tf_keras's Adam, its dense updates done by `ResourceApplyAdam`.

  The same algorithm, hyperparameters, slot variables and checkpoint layout
  as `tf_keras.optimizers.Adam`: m <- m + (1 - beta_1)(g - m),
  v <- v + (1 - beta_2)(g^2 - v), w <- w - lr_t m / (sqrt(v) + epsilon) with
  lr_t = lr sqrt(1 - beta_2^t) / (1 - beta_1^t). Sparse gradients,
  `amsgrad` and `adaptive_epsilon` fall back to tf_keras's update.

  The update's scalars (the step, beta_1^t, beta_2^t, the learning rate) are
  computed once per `apply_gradients` call and device, not once per
  variable: tf_keras's per-variable `update_step` would read the step and
  take both powers again for every variable, about ten ops each, which on
  a small model cost as much as the update itself.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    # A plain object: a dict attribute would be tracked into checkpoints.
    self._shared = _SharedScalars()

  def _distributed_apply_gradients_fn(self, distribution, grads_and_vars,
                                      **kwargs):
    with self._sharing_scalars():
      return super()._distributed_apply_gradients_fn(
          distribution, grads_and_vars, **kwargs)

  def _internal_apply_gradients(self, grads_and_vars):
    with self._sharing_scalars():
      return super()._internal_apply_gradients(grads_and_vars)

  @contextlib.contextmanager
  def _sharing_scalars(self):
    self._shared.scalars = {}
    try:
      yield
    finally:
      self._shared.scalars = None

  def _update_scalars(self, dtype: tf.DType,
                      device: str) -> dict[str, tf.Tensor]:
    """The step's beta powers, betas, learning rate and epsilon in `dtype`.

    Inside an apply call in graph mode, shared by the variables on one
    device in one graph (each variable of an XLA-compiled update has a
    graph of its own); computed afresh otherwise.
    """
    key = (dtype, device, tf.compat.v1.get_default_graph())
    cache = self._shared.scalars
    shared = cache is not None and not tf.executing_eagerly()
    if shared and key in cache:
      return cache[key]
    step = tf.cast(self.iterations + 1, dtype)
    beta_1 = tf.cast(self.beta_1, dtype)
    beta_2 = tf.cast(self.beta_2, dtype)
    scalars = dict(beta1_power=tf.pow(beta_1, step),
                   beta2_power=tf.pow(beta_2, step),
                   lr=tf.cast(self.learning_rate, dtype), beta1=beta_1,
                   beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype))
    if shared:
      cache[key] = scalars
    return scalars

  def update_step(self, gradient, variable):
    if (isinstance(gradient, tf.IndexedSlices) or self.amsgrad or
        self.adaptive_epsilon):
      return super().update_step(gradient, variable)
    dtype = variable.dtype
    index = self._index_dict[self._var_key(variable)]
    return tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=self._momentums[index].handle,
        v=self._velocities[index].handle, grad=tf.cast(gradient, dtype),
        use_locking=False, **self._update_scalars(dtype, variable.device))


class _SharedScalars:
  """`FusedAdam`'s scalars of the current apply call, or None between calls.

  Maps (dtype, device, graph) to the scalars `ResourceApplyAdam` takes.
  """

  def __init__(self):
    self.scalars: dict | None = None


@typecheck.checked
def make_optimizer_factory(name: str, learning_rate: float) -> OptimizerFactory:
  """A function that makes a fresh optimizer called `name`.

  Args:
    name: "adam" (`FusedAdam`) or "sgd" (`tf_keras.optimizers.SGD`).
    learning_rate: The learning rate.

  Returns:
    The factory.

  Raises:
    ConfigError: For an unknown name or a learning rate not above 0.
  """
  optimizers = {"adam": FusedAdam, "sgd": tf_keras.optimizers.SGD}
  errors.check_choice("optimizer", name, NAMES)
  if not learning_rate > 0:
    raise errors.ConfigError(
        f"--learning_rate={learning_rate}: must be positive")
  return lambda: optimizers[name](learning_rate=learning_rate)
