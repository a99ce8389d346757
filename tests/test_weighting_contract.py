"""The loss-weighting contract for weights that depend on the step's losses.

A weighting that declares `needs_losses` gets the step's global-batch
losses (all-reduced inside the forward pass, constants of the backward
pass). Checked with a weighting defined here, 1/L_i normalised to sum to T
(the form of GLS's and IMTL-L's gradients), against a NumPy reference of one
SGD step on 1, 2 and 4 replicas.
"""

from typing import Optional

from conftest import whole_batch_task_gradients
import numpy as np
import pytest
import tensorflow as tf

import mtl_dist
from mtl_dist.methods import catalog
from mtl_dist.methods import registry
from mtl_dist.methods.weightings import base


class _InverseLoss(base.LossWeighting):
  """w_i = T (1/L_i) / sum_j (1/L_j), from the step's global losses."""

  name = "test_inverse_loss"
  needs_losses = True

  def weights(self, step: tf.Tensor,
              losses: Optional[tf.Tensor] = None) -> tf.Tensor:
    del step
    inverse = 1.0 / losses
    return self.num_tasks * inverse / tf.reduce_sum(inverse)


if _InverseLoss.name not in registry.WEIGHTINGS.names():
  registry.WEIGHTINGS.register(_InverseLoss, catalog.Method(
      _InverseLoss.name, "a test weighting", needs_losses=True))


@pytest.mark.parametrize("replicas", [1, 2, 4])
@pytest.mark.parametrize("aggregator", ["sum", "mgda"])
def test_weights_from_the_steps_global_losses(build_trainer, shapes_arrays,
                                              replicas, aggregator):
  features, labels = shapes_arrays
  features = features[:64]  # One global batch: each step sees all of it.
  labels = {k: v[:64] for k, v in labels.items()}
  trainer, iterators, _, _ = build_trainer(
      replicas, "joint", ("shape", "x", "y"), weighting=_InverseLoss.name,
      aggregator=aggregator, optimizer="sgd", learning_rate=0.1,
      global_batch_size=64, arrays=(features, labels))
  losses, gradients = whole_batch_task_gradients(
      trainer, features, labels, trainer.model.trainable_variables)
  weights = 3 * (1 / losses) / (1 / losses).sum()
  before = [v.numpy() for v in trainer.model.trainable_variables]
  result = trainer.train(iterators, 1)
  logged = [result.step_metrics[f"{t}/weight"] for t in ("shape", "x", "y")]
  np.testing.assert_allclose(logged, weights, rtol=1e-5)
  if aggregator == "sum":  # The whole update: sum_i w_i grad L_i.
    for i, variable in enumerate(trainer.model.trainable_variables):
      want = before[i] - 0.1 * sum(w * g[i] for w, g in zip(weights,
                                                            gradients))
      np.testing.assert_allclose(variable.numpy(), want, rtol=1e-4,
                                 atol=1e-6)


def test_jit_compile_is_refused(build_trainer):
  with pytest.raises(ValueError, match="global losses"):
    build_trainer(1, "joint", weighting=_InverseLoss.name, jit_compile=True)


def test_the_function_gets_the_losses():
  got = mtl_dist.loss_weights(_InverseLoss.name, [1.0, 3.0])
  np.testing.assert_allclose(got, [1.5, 0.5], rtol=1e-6)
