"""Mixtures of experts with per-task gates: MMoE, CGC, PLE and DSelect-k.

One class holds all four; they differ in how many extraction levels there
are, which experts each gate mixes and what the gates are:

- MMoE (Ma et al. 2018): one level of shared experts; each task's softmax
  gate, fed by the input, mixes them; the task's head (tower) reads the
  mixture.
- CGC (Tang et al. 2020): one level of shared experts plus private experts
  per task; a task's gate mixes the shared experts and its own.
- PLE (Tang et al. 2020): CGC stacked in levels. At every level but the last
  a shared gate, fed by the shared path, mixes all experts of the level (the
  shared ones and every task's) into the next level's shared input; each
  task's gate, fed by the task's path, mixes the shared experts and its own.
- DSelect-k (Hazimeh et al. 2021): MMoE whose gates select k experts through
  a differentiable binary encoding (`DSelectKGate`).

Ownership (the architecture contract): shared are the shared experts and
PLE's shared gates; a task's own are its private experts, its gates and its
head. In PLE a task's inner-level experts also feed the shared gate, so other
tasks' losses reach them: the joint step gives them the objective's
gradient, as end-to-end training does; an alternate step for another task
leaves them unchanged.

Gates and mixtures compute in float32 whatever the experts' dtype policy.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from mtl_dist.model import base

# Small constant of the official DSelect-k entropy regularizer.
_EPSILON = 1e-6


def mix(weights: tf.Tensor, experts: tf.Tensor) -> tf.Tensor:
  """sum_i weights[:, i] * experts[:, i]: [B, n] weights, [B, n, ...] experts."""
  weights = tf.reshape(weights, [-1, weights.shape[-1]] +
                       [1] * (experts.shape.rank - 2))
  return tf.reduce_sum(weights * experts, axis=1)


def _stack(outputs: Sequence[tf.Tensor]) -> tf.Tensor:
  """[B, n, ...] float32 from n expert outputs."""
  return tf.stack([tf.cast(output, tf.float32) for output in outputs], axis=1)


class SoftmaxGate(tf_keras.layers.Layer):
  """Softmax weights over n experts from a logits layer (MMoE's gate)."""

  def __init__(self, logits: tf_keras.layers.Layer, **kwargs):
    """Initialises the gate.

    Args:
      logits: Maps the gate's input to [B, n] logits.
      **kwargs: Passed to `tf_keras.layers.Layer`.
    """
    super().__init__(**kwargs)
    self.logits = logits

  def call(self, inputs: tf.Tensor, training: Optional[bool] = None
           ) -> tf.Tensor:
    return tf.nn.softmax(tf.cast(self.logits(inputs, training=training),
                                 tf.float32), axis=-1)


def default_gate(num_experts: int) -> tf_keras.layers.Layer:
  """A gate's logits: a linear layer of the flattened input, in float32."""
  return tf_keras.Sequential([
      tf_keras.layers.Flatten(dtype="float32"),
      tf_keras.layers.Dense(num_experts, dtype="float32")])


def smooth_step(x: tf.Tensor, gamma: float) -> tf.Tensor:
  """DSelect-k's smooth step: 0 below -gamma/2, 1 above gamma/2, cubic between."""
  cubic = -2.0 / gamma**3 * x**3 + 3.0 / (2.0 * gamma) * x + 0.5
  return tf.where(x <= -gamma / 2, tf.zeros_like(x),
                  tf.where(x >= gamma / 2, tf.ones_like(x), cubic))


class DSelectKGate(tf_keras.layers.Layer):
  """DSelect-k's example-conditioned gate (Hazimeh et al. 2021).

  k single-expert selectors each encode an expert index in
  m = ceil(log2 n) smooth-step "bits" of the input; a softmax over k more
  logits weighs the selectors. The weights sum to 1 and, once the bits
  saturate, at most k are non-zero. Initialisation follows the official
  layer (z logits uniform in +-gamma/100, w logits uniform in +-0.05). In
  training it adds `entropy_reg` times the selectors' entropy and, when n is
  not a power of two, the official term that keeps unreachable codes from
  taking the weight, both as means over the batch's examples (the official
  layer sums them over the batch, so there the coefficient grows with the
  batch size); a mean keeps them independent of batch size and replica
  count.
  """

  def __init__(self, num_experts: int, num_selected: int, gamma: float,
               entropy_reg: float, **kwargs):
    """Initialises the gate.

    Args:
      num_experts: n >= 2.
      num_selected: k, the most experts the gate selects.
      gamma: The smooth step's width.
      entropy_reg: The entropy regularization's coefficient.
      **kwargs: Passed to `tf_keras.layers.Layer`.
    """
    super().__init__(dtype="float32", **kwargs)
    self.num_experts = num_experts
    self.num_selected = num_selected
    self.gamma = gamma
    self.entropy_reg = entropy_reg
    self.num_bits = math.ceil(math.log2(num_experts))
    codes = np.array([[int(bit) for bit in np.binary_repr(i, self.num_bits)]
                      for i in range(num_experts)], dtype=bool)
    self._codes = codes  # [n, m]
    # One initializer object per variable: tf_keras's unseeded initializers
    # give the same values each time one object is called.
    z_init = lambda: tf_keras.initializers.RandomUniform(  # noqa: E731
        -gamma / 100, gamma / 100)
    w_init = lambda: tf_keras.initializers.RandomUniform(  # noqa: E731
        -0.05, 0.05)
    self.flatten = tf_keras.layers.Flatten(dtype="float32")
    self.z_logits = tf_keras.layers.Dense(
        num_selected * self.num_bits, kernel_initializer=z_init(),
        bias_initializer=z_init(), dtype="float32")
    self.w_logits = tf_keras.layers.Dense(
        num_selected, kernel_initializer=w_init(), bias_initializer=w_init(),
        dtype="float32")

  def selectors(self, inputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """([B, k, n] single-expert selector outputs, [B, k] their weights)."""
    features = self.flatten(inputs)
    bits = smooth_step(tf.reshape(
        self.z_logits(features), [-1, self.num_selected, 1, self.num_bits]),
                       self.gamma)
    outputs = tf.reduce_prod(tf.where(self._codes[None, None], bits,
                                      1.0 - bits), axis=3)
    weights = tf.nn.softmax(self.w_logits(features), axis=1)
    return outputs, weights

  def call(self, inputs: tf.Tensor, training: Optional[bool] = None
           ) -> tf.Tensor:
    outputs, weights = self.selectors(inputs)
    if training:
      entropy = -tf.reduce_sum(outputs * tf.math.log(outputs + _EPSILON),
                               axis=[1, 2])
      loss = self.entropy_reg * tf.reduce_mean(entropy)
      if self.num_experts != 2**self.num_bits:
        loss += tf.reduce_mean(tf.reduce_sum(
            1.0 / tf.reduce_sum(outputs, axis=-1), axis=-1))
      self.add_loss(loss)
    return tf.reduce_sum(weights[:, :, None] * outputs, axis=1)


class MixtureOfExpertsModel(base.MultiTaskModel):
  """Levels of shared and per-task experts mixed by gates (see module doc).

  Level l has `shared_experts[l]`, `task_experts[l][task]` and
  `task_gates[l][task]`; every level but the last of a PLE has
  `shared_gates[l]`. With one level and no shared gate, the shared experts'
  stacked outputs [B, n, D] are the representation every task reads.
  """

  def __init__(self, shared_experts: Sequence[Sequence[tf_keras.layers.Layer]],
               task_experts: Sequence[Mapping[str, Sequence[
                   tf_keras.layers.Layer]]],
               task_gates: Sequence[Mapping[str, tf_keras.layers.Layer]],
               shared_gates: Sequence[tf_keras.layers.Layer],
               heads: Mapping[str, tf_keras.layers.Layer], **kwargs):
    super().__init__(**kwargs)
    self.shared_experts = [list(level) for level in shared_experts]
    self.task_experts = [{task: list(experts) for task, experts in
                          level.items()} for level in task_experts]
    self.task_gates = [dict(level) for level in task_gates]
    self.shared_gates = list(shared_gates)
    self.heads = dict(heads)
    self.has_representation = (len(self.shared_experts) == 1 and
                               not self.shared_gates)

  def _expert_names(self, level: int, task: str) -> list[str]:
    private = any(self.task_experts[level][t] for t in self.task_names)
    shared = [f"{'shared' if private else 'expert'}{i}"
              for i in range(len(self.shared_experts[level]))]
    own = [f"own{i}" for i in range(len(self.task_experts[level][task]))]
    prefix = f"level{level}/" if len(self.shared_experts) > 1 else ""
    return [prefix + name for name in shared + own]

  def diagnostic_names(self, tasks: Optional[Sequence[str]] = None
                       ) -> tuple[str, ...]:
    """`<task>/gate/<expert>`: each task's mean gate weight per expert."""
    return tuple(f"{task}/gate/{name}"
                 for task in self._ordered(tasks)
                 for level in range(len(self.shared_experts))
                 for name in self._expert_names(level, task))

  def _ordered(self, tasks: Optional[Sequence[str]]) -> list[str]:
    wanted = set(self.task_names if tasks is None else tasks)
    return [task for task in self.task_names if task in wanted]

  def forward(self, inputs: tf.Tensor, training: Optional[bool] = None,
              tasks: Optional[Sequence[str]] = None) -> base.Forward:
    wanted = self._ordered(tasks)
    num_levels = len(self.shared_experts)
    task_inputs = {task: inputs for task in self.task_names}
    shared_input = inputs
    representation = None
    diagnostics = {}
    for level in range(num_levels):
      last = level == num_levels - 1
      # A shared gate mixes every task's experts, so every path runs.
      paths = wanted if last else self.task_names
      shared = _stack([expert(shared_input, training=training)
                       for expert in self.shared_experts[level]])
      if self.has_representation:
        representation = shared
      own, next_inputs = {}, {}
      for task in paths:
        experts = self.task_experts[level][task]
        own[task] = [expert(task_inputs[task], training=training)
                     for expert in experts]
        candidates = (tf.concat([shared, _stack(own[task])], axis=1)
                      if experts else shared)
        weights = self.task_gates[level][task](task_inputs[task],
                                               training=training)
        next_inputs[task] = mix(weights, candidates)
        if task in wanted:
          means = tf.reduce_mean(weights, axis=0)
          for i, name in enumerate(self._expert_names(level, task)):
            diagnostics[f"{task}/gate/{name}"] = means[i]
      if not last:
        candidates = tf.concat(
            [shared] + [_stack(own[task]) for task in self.task_names
                        if own[task]], axis=1)
        shared_input = mix(self.shared_gates[level](shared_input,
                                                    training=training),
                           candidates)
      task_inputs = next_inputs
    outputs = {task: self.heads[task](task_inputs[task], training=training)
               for task in wanted}
    return base.Forward(
        outputs, representation,
        {name: diagnostics[name] for name in self.diagnostic_names(wanted)})

  def shared_layers(self) -> list[tf.Module]:
    return [expert for level in self.shared_experts for expert in level] + (
        list(self.shared_gates))

  def task_layers(self, task: str) -> list[tf.Module]:
    return ([expert for level in self.task_experts for expert in level[task]]
            + [level[task] for level in self.task_gates] + [self.heads[task]])

  def last_shared_kernel(self) -> list[tf.Variable]:
    """The last weight matrix of each last-level shared expert."""
    kernels = []
    for expert in self.shared_experts[-1]:
      matrices = [v for v in expert.trainable_variables if v.shape.rank >= 2]
      if matrices:
        kernels.append(matrices[-1])
    if not kernels:
      raise ValueError("the shared experts have no weight matrix for "
                       "GradNorm's W")
    return kernels


# Makes an expert for a level (0 is the first, fed by the input).
ExpertMaker = Callable[[int], tf_keras.layers.Layer]
# Makes a gate for n experts: a layer mapping its input to [B, n] weights.
GateMaker = Callable[[int], tf_keras.layers.Layer]


def build(task_names: Sequence[str], num_levels: int, num_shared: int,
          num_private: int, shared_gates: bool, make_expert: ExpertMaker,
          make_gate: GateMaker, heads: Mapping[str, tf_keras.layers.Layer],
          name: str) -> MixtureOfExpertsModel:
  """An unbuilt mixture-of-experts model.

  Args:
    task_names: The tasks, in order.
    num_levels: Extraction levels (1 for MMoE, CGC and DSelect-k).
    num_shared: Shared experts per level.
    num_private: Private experts per task and level.
    shared_gates: Whether every level but the last has a shared gate (PLE).
    make_expert: Makes one expert of a level.
    make_gate: Makes one gate over n experts.
    heads: Task name to its head (tower).
    name: The model's name.
  """
  num_tasks = len(task_names)
  return MixtureOfExpertsModel(
      shared_experts=[[make_expert(level) for _ in range(num_shared)]
                      for level in range(num_levels)],
      task_experts=[{task: [make_expert(level) for _ in range(num_private)]
                     for task in task_names} for level in range(num_levels)],
      task_gates=[{task: make_gate(num_shared + num_private)
                   for task in task_names} for _ in range(num_levels)],
      shared_gates=[make_gate(num_shared + num_tasks * num_private)
                    for _ in range(num_levels - 1)] if shared_gates else [],
      heads=heads, name=name)
