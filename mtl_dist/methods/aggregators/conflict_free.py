"""`conflict_free`: ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks").

With the unit gradients u_i = g_i / |g_i| (U = [u_i], [T, P]), the direction
d = pinv(U) 1 solves u_i . d = 1 for every task (least squares, least norm,
where that has no solution), and the update is the sum of the gradients'
projections on it (Eq. 2; TorchJD's `ConFIG`, src/torchjd/aggregation/
_config.py in torchjd 0.8.1, with its default `pref_vector`, ones):

    update = (sum_i g_i . d^) d^,   d^ = d / |d|.

It is a combination of the g_i with coefficients from the Gram matrix M
alone, computed exactly so (and so it also runs with `--rep_grad`): with
the norms n_i = sqrt(M_ii), the cosine matrix C = U U^T = M_ij / (n_i n_j)
= Q L Q^T (float64) and c = pinv(C) 1,

    d = U^T c,  |d|^2 = c^T C c = sum_k (q_k . 1)^2 / l_k,
    sum_i g_i . d = n^T C c = n^T Q Q^T 1,
    update = sum_i a_i g_i,  a = (c / n) (n^T C c) / |d|^2.

The pseudo-inverse keeps the eigenvalues l > l_max * T * 2^-23 (float32's
epsilon: C comes from a float32 Gram matrix, so smaller ones are its
rounding). In singular values s of U that drops s <= s_max sqrt(T 2^-23)
(6e-4 s_max for T = 3), where TorchJD's float32 `torch.linalg.pinv` drops
s <= s_max max(T, P) 2^-23: unit gradients dependent up to ~1e-3 (a sum of
two gradients rounded to float32, a near-duplicate) are treated as
dependent, and d is the least-squares solution.

Degenerate inputs:
- a zero gradient (n_i = 0 exactly) has no unit vector: as TorchJD's
  `nan_to_num` it counts as u_i = 0, so it asks nothing of d and gets
  a_i = 0 (it still adds g_i . d = 0 to the length);
- if the all-ones vector is (numerically) orthogonal to the range of C,
  i.e. the unit gradients sum to 0 (exactly opposite tasks), no direction
  has a positive cosine with every task and pinv(U) 1 = 0: the update is 0,
  as TorchJD's in exact arithmetic. "Numerically": the part of 1 in the
  kept eigenvectors has |Q_k^T 1|^2 <= T * 2^-23, which only the rounding
  of an exactly orthogonal one gives (a nearly opposite pair has a small
  eigenvalue that is kept, and a large |d|). TorchJD in float32 instead
  normalises whatever rounding gives, which can then conflict.
- every gradient zero: the update is 0.
Equal to TorchJD elsewhere; `pref_vector` (the right-hand side, ones) is
not an option (options are scalars).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import registry
from mtl_dist.methods.aggregators import base


def conflict_free_weights(gram: tf.Tensor) -> tf.Tensor:
  """ConFIG's [T] coefficients a of update = sum_i a_i g_i.

  Args:
    gram: G G^T of the task gradients G, [T, T].

  Returns:
    The float32 coefficients; zeros if every gradient is 0 or the unit
    gradients sum to 0.
  """
  gram = tf.cast(gram, tf.float64)
  num_tasks = gram.shape[0]
  gram = 0.5 * (gram + tf.transpose(gram))
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  active = norms > 0.0
  active_f = tf.cast(active, tf.float64)
  safe_norms = tf.where(active, norms, tf.ones_like(norms))
  # A zero gradient's unit vector is 0: its row and column of C are 0.
  cosine = (active_f[:, None] * active_f[None, :] * gram /
            (safe_norms[:, None] * safe_norms[None, :]))
  # TensorFlow's eigh raises on a non-finite matrix (an overflow the step
  # skips): decompose 0 instead, and return NaN coefficients below.
  finite = tf.reduce_all(tf.math.is_finite(cosine))
  cosine = tf.where(finite, cosine, tf.zeros_like(cosine))
  eigenvalues, vectors = tf.linalg.eigh(cosine)
  largest = tf.reduce_max(eigenvalues)
  keep = eigenvalues > largest * num_tasks * base.FLOAT32_EPSILON
  keep_f = tf.cast(keep, tf.float64)
  safe = tf.where(keep, eigenvalues, tf.ones_like(eigenvalues))
  # Q^T 1 on the kept eigenvectors.
  ones_part = keep_f * tf.reduce_sum(vectors, axis=0)
  c = tf.linalg.matvec(vectors, ones_part / safe)          # pinv(C) 1
  length_sq = tf.reduce_sum(ones_part * ones_part / safe)  # |d|^2
  projected = tf.linalg.matvec(vectors, ones_part)         # C c
  along = tf.reduce_sum(norms * projected)                 # sum_i g_i . d
  exists = (tf.reduce_sum(ones_part * ones_part) >
            num_tasks * base.FLOAT32_EPSILON)
  ratio = tf.where(exists, along / tf.where(exists, length_sq, 1.0), 0.0)
  coefficients = active_f * c / safe_norms * ratio
  return tf.cast(tf.where(finite, coefficients, float("nan")), tf.float32)


@registry.AGGREGATORS.register
class ConflictFree(base.GramAggregator):
  """ConFIG: the summed projections on the equal-cosine direction."""

  name = "conflict_free"
  promises = frozenset({base.ORDER_INVARIANT, base.HOMOGENEOUS})

  def gram_coefficients(self, gram: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
    del step
    return conflict_free_weights(gram)
