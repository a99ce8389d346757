"""The system G w = w^(-p), w > 0, shared by Nash-MTL and FairGrad.

Nash-MTL (p = 1: w_i (G w)_i = 1) and FairGrad (p = 1 / alpha) both weight
the task gradients by the positive solution w of

    (G w)_i = w_i^(-p)  for every task i,   G = J J^T,

which is the stationarity condition of the strictly convex problem

    minimise 0.5 w^T G w - sum_i f(w_i)  over w > 0,   f'(w) = w^(-p)

(f = log for p = 1, f(w) = (w^(1-p) - 1) / (1 - p) otherwise; concave for
every p > 0). `solve` finds it in float64 from the Gram matrix alone:

- Scale. With D = diag(|g_i|), r = max_i |g_i|, C = D^-1 G D^-1 (the
  cosines) and w = r^(-2/(1+p)) (D/r)^-1 y, the system becomes
  C y = b * y^(-p) with b_i = (|g_i| / r)^(p-1) (b = 1 for p = 1), so the
  solver sees a matrix with unit diagonal whatever the gradients' scales
  (1e-6..1e6 and beyond), and scales the answer back exactly.
- Regularisation. Where a positive combination of the gradients vanishes
  (e.g. g and -g), no solution exists: the objective decreases without
  bound along that direction. As TorchJD's UPGrad does with `reg_eps`,
  C + reg_eps I is solved instead; first C is shifted by its most negative
  eigenvalue, if any (float32 rounding of an exactly rank-deficient Gram
  matrix), so the matrix solved is always positive definite and the
  solution always exists. On such inputs the weights grow like
  reg_eps^(-1/2) along the vanishing combination while the update stays
  bounded (for p = 1, |sum_i y_i g_i / |g_i||^2 <= T up to the float32
  rounding of G). Elsewhere the
  ridge adds reg_eps y_i to equation i: a share reg_eps of its terms for
  orthogonal gradients, about 1e-8..1e-7 for p = 1 and up to a few 1e-6
  for p = 2 with norms spanning 1e-3..1e3 (the default 1e-8).
- A task whose gradient vanishes (|g_i| <= 1e-8 max_j |g_j|) has no
  solution w_i (its equation reads 0 = w_i^-p); its weight is 0 and it
  takes no part (the others' equations do not involve it). All gradients
  zero: all weights 0.

The solver is damped Newton with a backtracking (Armijo) line search on
the convex objective, every step kept inside w > 0 (at most 99% of the way
to the boundary), from the solution of the diagonal part, XLA-compiled,
stopping when every equation holds to 1e-13 of the size of its terms,
when no step improves the objective (rounding), or after 100 steps (it
takes 3 to 10 on random gradients with norms spanning 1e-3..1e3, at most
16 on the degenerate inputs of tests/test_nash_mtl.py).
"""

from __future__ import annotations

import tensorflow as tf

from mtl_dist.methods import catalog
from mtl_dist.methods.aggregators import base

# The default ridge added to the cosine matrix C (see the module docstring;
# --nash_mtl_reg_eps and --fairgrad_reg_eps in the catalogue).
REG_EPS = catalog.BARGAINING_REG_EPS

_NEWTON_LIMIT = 100  # At most this many Newton steps.
# Stop when max_i |(A y)_i - b_i y_i^-p| / ((|A| y)_i + b_i y_i^-p) is below
# this (each equation holds up to this share of its terms' size).
_TOLERANCE = 1e-13
_HALVINGS = 40  # Step sizes tried: 1, 1/2, ..., 2^-39 (times the bound's).
_ARMIJO = 0.25  # Sufficient decrease: this share of the Newton decrement.
_ROUNDING = 1e-13  # Objective changes below this, relatively, are rounding.
_TO_BOUNDARY = 0.99  # No step goes further than this share to y_i = 0.


@tf.function(jit_compile=True)
def _newton(matrix: tf.Tensor, scales: tf.Tensor,
            power: tf.Tensor) -> tf.Tensor:
  """The y > 0 with matrix y = scales * y^-power (float64, positive definite
  `matrix`), minimising 0.5 y^T A y - sum_i b_i f(y_i)."""
  complement = 1.0 - power
  is_log = tf.abs(complement) < 1e-12
  safe_complement = tf.where(is_log, tf.ones_like(complement), complement)

  def objective(points):
    """[K] objective values at [K, T] points, and their terms' magnitude."""
    quadratic = 0.5 * tf.reduce_sum(
        points * tf.linalg.matmul(points, matrix), axis=-1)
    logs = tf.math.log(points)
    utility = scales * tf.where(
        is_log, logs, tf.math.expm1(safe_complement * logs) / safe_complement)
    return (quadratic - tf.reduce_sum(utility, axis=-1),
            tf.abs(quadratic) + tf.reduce_sum(tf.abs(utility), axis=-1))

  def residual(y):
    """A y - b y^-p, b y^-p, and the size of the terms, |A| y + b y^-p."""
    pull = scales * tf.exp(-power * tf.math.log(y))
    return (tf.linalg.matvec(matrix, y) - pull, pull,
            tf.linalg.matvec(tf.abs(matrix), y) + pull)

  def body(count, y, done):
    del done
    gradient, pull, _ = residual(y)
    hessian = matrix + tf.linalg.diag(power * pull / y)
    step = -tf.linalg.cholesky_solve(tf.linalg.cholesky(hessian),
                                     gradient[:, None])[:, 0]
    decrement = tf.maximum(-tf.reduce_sum(gradient * step), 0.0)
    shrinking = step < 0.0
    to_bound = tf.reduce_min(
        tf.where(shrinking, -y / tf.where(shrinking, step, -1.0), 2.0))
    first = tf.minimum(tf.constant(1.0, tf.float64), _TO_BOUNDARY * to_bound)
    sizes = first * 0.5**tf.range(_HALVINGS, dtype=tf.float64)
    current, magnitude = objective(y[None])
    trial, _ = objective(y[None] + sizes[:, None] * step[None])
    good = trial <= (current - _ARMIJO * sizes * decrement +
                     _ROUNDING * magnitude)
    moved = tf.reduce_any(good)
    size = tf.where(moved, tf.gather(sizes, tf.argmax(tf.cast(good, tf.int32))),
                    tf.zeros_like(first))
    y = y + size * step
    gradient, _, size = residual(y)
    converged = tf.reduce_max(tf.abs(gradient) / size) <= _TOLERANCE
    return count + 1, y, tf.logical_or(converged, tf.logical_not(moved))

  # From the solution with the off-diagonal part of the matrix dropped.
  start = tf.exp(tf.math.log(scales / tf.linalg.diag_part(matrix)) /
                 (1.0 + power))
  _, y, _ = tf.while_loop(
      lambda count, y, done: tf.logical_and(tf.logical_not(done),
                                            count < _NEWTON_LIMIT),
      body, (tf.constant(0), start,
             tf.logical_not(tf.reduce_all(tf.math.is_finite(matrix)))))
  return y


def solve(gram: tf.Tensor, power: float, reg_eps: float = REG_EPS
          ) -> tf.Tensor:
  """The w > 0 with (G w)_i = w_i^-power, from the Gram matrix (float64).

  Args:
    gram: G = J J^T, [T, T] (any float dtype).
    power: p > 0 (1 for Nash-MTL, 1 / alpha for FairGrad).
    reg_eps: Added to the diagonal of the (eigenvalue-shifted) cosine
      matrix, so that a solution exists (see the module docstring).

  Returns:
    [T] float64 w: 0 for vanishing gradients (all 0 if every gradient
    vanishes); NaN everywhere if `gram` is not finite.
  """
  gram = tf.cast(gram, tf.float64)
  num_tasks = gram.shape[0]
  finite = tf.reduce_all(tf.math.is_finite(gram))
  gram = tf.where(finite, gram, tf.zeros_like(gram))
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  top = tf.reduce_max(norms)
  active = norms > base.VANISHING * top
  active_f = tf.cast(active, tf.float64)
  safe_norms = tf.where(active, norms, tf.ones_like(norms))
  safe_top = tf.where(top > 0.0, top, tf.ones_like(top))
  eye = tf.eye(num_tasks, dtype=tf.float64)
  cosine = (active_f[:, None] * active_f[None, :] * gram /
            (safe_norms[:, None] * safe_norms[None, :]) +
            tf.linalg.diag(1.0 - active_f))
  cosine = 0.5 * (cosine + tf.transpose(cosine))
  shift = tf.maximum(-tf.reduce_min(tf.linalg.eigvalsh(cosine)), 0.0)
  matrix = cosine + (shift + reg_eps) * eye
  relative = safe_norms / safe_top
  scales = tf.where(active, relative**(power - 1.0), tf.ones_like(relative))
  y = _newton(matrix, scales, tf.constant(power, tf.float64))
  weights = (active_f * y / relative *
             safe_top**(-2.0 / (1.0 + power)))
  nan = tf.constant(float("nan"), tf.float64)
  return tf.where(finite, weights, tf.fill([num_tasks], nan))


def clip_to_norm(coefficients: tf.Tensor, gram: tf.Tensor,
                 max_norm: float) -> tf.Tensor:
  """Scales a so that |sum_i a_i g_i| <= max_norm (max_norm 0: unchanged).

  Args:
    coefficients: [T] a.
    gram: [T, T] G = J J^T, giving |sum_i a_i g_i|^2 = a^T G a.
    max_norm: The largest norm; 0 for no clipping.

  Returns:
    [T] coefficients, of `coefficients`' dtype.
  """
  if max_norm <= 0:
    return coefficients
  a = tf.cast(coefficients, tf.float64)
  norm = tf.sqrt(tf.maximum(tf.reduce_sum(
      a * tf.linalg.matvec(tf.cast(gram, tf.float64), a)), 0.0))
  factor = tf.where(norm > max_norm,
                    max_norm / tf.where(norm > 0.0, norm, 1.0), 1.0)
  return tf.cast(a * factor, coefficients.dtype)
