"""`aligned_mtl`: Aligned-MTL (Senushkin et al. 2023, "Independent Component
Alignment for Multi-Task Learning").

The task gradients G = [g_i] ([T, P], Gram matrix M = G G^T = V L V^T) are
replaced by aligned ones with orthogonal directions and equal norms, the
smallest singular value of G: G' = B^T G with the balance transformation

    B = sqrt(l_min) V L^-1/2 V^T,

and the update is G'^T w = G^T B w for the preference vector w = 1/T
(Algorithm 1; TorchJD's `AlignedMTL`, src/torchjd/aggregation/_aligned_mtl.py
in torchjd 0.8.1). The coefficients a = B w come from the Gram matrix alone,
so the method also runs with `--rep_grad`. The eigendecomposition is in
float64.

Near-zero eigenvalues: as in TorchJD and LibMTL, only the eigenpairs with
l > l_max * T * 2^-23 (float32's epsilon; TorchJD uses `torch.finfo().eps`,
float32's, whatever the dtype) count: the others, the rank deficiency of G
and float32 rounding of M, are left out of B, and l_min is the smallest
eigenvalue kept. If none is kept (M = 0: every gradient is 0) B is the
identity, as in TorchJD, and the update is the mean of the (zero)
gradients.

Differences from the references:
- TorchJD's `pref_vector` (any [T] vector; default the mean's 1/T) is fixed
  at 1/T: options are scalars here. LibMTL (`Aligned_MTL.py`) uses
  w = 1 (`B.sum(0)`), an update T times this one; TorchJD's published
  values use 1/T.
- TorchJD's `scale_mode` ("min", the paper's and the default; "median";
  "rmse", the mean eigenvalue) is an argument of `aligned_mtl_weights`,
  not a flag (options are numbers); the aggregator uses "min".
- LibMTL has no guard for M = 0 (it divides by sqrt(0)).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base

SCALE_MODES = ("min", "median", "rmse")


def aligned_mtl_weights(gram: tf.Tensor, scale_mode: str = "min"
                        ) -> tf.Tensor:
  """Aligned-MTL's [T] coefficients a = B 1/T from the [T, T] Gram matrix.

  Args:
    gram: G G^T of the task gradients G, [T, T].
    scale_mode: The eigenvalue whose square root scales the aligned
      gradients: "min" (the smallest kept; the paper's), "median" (the
      lower median of the kept ones, as torch.median) or "rmse" (their
      mean), as TorchJD's `scale_mode`.

  Returns:
    The float32 coefficients of update = sum_i a_i g_i.

  Raises:
    ValueError: For an unknown scale_mode.
  """
  if scale_mode not in SCALE_MODES:
    raise ValueError(f"scale_mode={scale_mode!r}: must be one of "
                     f"{', '.join(SCALE_MODES)}")
  gram = tf.cast(gram, tf.float64)
  num_tasks = gram.shape[0]
  gram = 0.5 * (gram + tf.transpose(gram))
  # TensorFlow's eigh raises on a non-finite matrix (an overflow the step
  # skips): decompose 0 instead, and return NaN coefficients below.
  finite = tf.reduce_all(tf.math.is_finite(gram))
  gram = tf.where(finite, gram, tf.zeros_like(gram))
  eigenvalues, vectors = tf.linalg.eigh(gram)
  largest = tf.reduce_max(eigenvalues)
  keep = eigenvalues > largest * num_tasks * base.FLOAT32_EPSILON
  keep_f = tf.cast(keep, tf.float64)
  count = tf.reduce_sum(tf.cast(keep, tf.int32))
  safe = tf.where(keep, eigenvalues, tf.ones_like(eigenvalues))
  if scale_mode == "min":
    scale = tf.reduce_min(tf.where(keep, eigenvalues, largest))
  elif scale_mode == "median":
    # The kept eigenvalues first, ascending; the lower median of them.
    ascending = tf.sort(tf.where(keep, eigenvalues,
                                 tf.constant(float("inf"), tf.float64)))
    scale = tf.gather(ascending, tf.maximum(count - 1, 0) // 2)
  else:
    scale = (tf.reduce_sum(keep_f * eigenvalues) /
             tf.maximum(tf.reduce_sum(keep_f), 1.0))
  inverse_roots = keep_f / tf.sqrt(safe)
  balance = tf.sqrt(tf.maximum(scale, 0.0)) * tf.linalg.matmul(
      vectors * inverse_roots[None, :], vectors, transpose_b=True)
  # No eigenvalue kept (every gradient 0): B = I, as in TorchJD.
  balance = tf.where(count > 0, balance,
                     tf.eye(num_tasks, dtype=tf.float64))
  preference = tf.fill([num_tasks], tf.constant(1.0 / num_tasks, tf.float64))
  coefficients = tf.linalg.matvec(balance, preference)
  return tf.cast(tf.where(finite, coefficients, float("nan")), tf.float32)


@registry.AGGREGATORS.register
class AlignedMTL(base.GramAggregator):
  """Aligned-MTL: the gradients aligned to equal, orthogonal ones, averaged."""

  name = "aligned_mtl"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return aligned_mtl_weights(gram)
