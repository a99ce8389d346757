"""The exact solver behind MGDA and CAGrad: a convex problem over the simplex.

Both methods minimise a convex function of g_w = sum_i w_i g_i over the task
simplex {w >= 0, sum w = 1}, given only the Gram matrix of the task
gradients. `simplex_barrier` solves it to float64 precision on the float32
Gram matrix with one XLA-compiled interior-point method.
"""

from __future__ import annotations

import tensorflow as tf


def _solver(function):
  """`function` compiled with XLA: for the [T, T] solvers' loops.

  Each Newton step of a solver is a few dozen tiny ops on [T, T] matrices;
  TensorFlow's executor spends microseconds on each, XLA fuses the whole
  loop. Only the solvers are compiled: the [T, P] products around them are
  faster in TensorFlow's own kernels.
  """
  return tf.function(function, jit_compile=True)


# The barrier method's settings (see `simplex_barrier`).
_BARRIER_GROWTH = 10.0  # t grows by this factor after each centring.
_NEWTON_LIMIT = 200  # At most this many Newton steps in all ...
_CENTRING_LIMIT = 12  # ... and this many for one t.
_CENTRED = 1e-10  # Newton decrement^2 / 2 below which a point is centred.
_GAP_RELATIVE = 1e-12  # Stop when the gap bound is below this x |f(w)| ...
_GAP_FLOOR = 1e-17  # ... plus this (f on the Gram matrix scaled to 1).
_SMOOTHING = 1e-20  # CAGrad's |g_w| is sqrt(|g_w|^2 + this), scaled.
_SHORTEST_STEP = 1e-9  # A line search that needs a shorter step gives up.
_RIDGE = 1e-15  # Added to the unit diagonal of the scaled Hessian.


@_solver
def _simplex_barrier(gram: tf.Tensor, linear: tf.Tensor, norm_weight: tf.Tensor,
                     quadratic: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """`simplex_barrier`, compiled; also returns the Newton steps taken."""
  num_tasks = gram.shape[0]
  gram = tf.cast(gram, tf.float64)
  # gram = N C N, N the diagonal of the tasks' norms, C their cosines; with
  # C = V diag(l) V^T, gram / scale = factor factor^T for the factor
  # N V sqrt(l / scale). Then |g_w| = |factor^T w|, without the cancellation
  # of w^T gram w, and with each task's part as precise as its own norm
  # however much the norms differ; negative rounding eigenvalues dropped.
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  safe_norms = tf.where(norms > 0.0, norms, tf.ones_like(norms))
  cosines = gram / tf.einsum("i,j->ij", safe_norms, safe_norms)
  eigenvalues, eigenvectors = tf.linalg.eigh(
      0.5 * (cosines + tf.transpose(cosines)))
  factor = (norms[:, None] * eigenvectors *
            tf.sqrt(tf.maximum(eigenvalues, 0.0)))
  scale = tf.maximum(tf.reduce_max(tf.reduce_sum(factor * factor, axis=1)),
                     1e-300)
  factor = factor / tf.sqrt(scale)
  matrix = tf.linalg.matmul(factor, factor, transpose_b=True)
  linear = tf.cast(linear, tf.float64) / scale
  norm_weight = tf.cast(norm_weight, tf.float64) / tf.sqrt(scale)
  eye = tf.eye(num_tasks, dtype=tf.float64)

  def objective_parts(w):
    projected = tf.linalg.matvec(factor, w, transpose_a=True)
    squared = tf.reduce_sum(projected * projected)
    return squared, tf.linalg.matvec(factor, projected)  # w^T M w, M w.

  def objective(w):
    squared, _ = objective_parts(w)
    if quadratic:
      return squared
    return tf.reduce_sum(linear * w) + norm_weight * tf.sqrt(
        squared + _SMOOTHING)

  def objective_size(w):
    """|f(w)|'s natural size: f itself for |g_w|^2 (>= 0); the sum of the
    sizes of its two terms for CAGrad's, which can cancel to ~0 at the
    optimum (a gap relative to |f| would then never be reached)."""
    if quadratic:
      return tf.abs(objective(w))
    squared, _ = objective_parts(w)
    return tf.abs(tf.reduce_sum(linear * w)) + norm_weight * tf.sqrt(
        squared + _SMOOTHING)

  def barrier(w, t):
    inside = tf.reduce_all(w > 0.0)
    value = t * objective(w) - tf.reduce_sum(
        tf.math.log(tf.where(w > 0.0, w, tf.ones_like(w))))
    return tf.where(inside, value, tf.constant(float("inf"), tf.float64))

  def newton_step(w, t):
    squared, mw = objective_parts(w)
    if quadratic:
      grad, hessian = 2.0 * mw, 2.0 * matrix
    else:
      norm = tf.sqrt(squared + _SMOOTHING)
      grad = linear + norm_weight * mw / norm
      hessian = norm_weight * (matrix / norm - tf.einsum("i,j->ij", mw, mw) /
                               norm**3)
    gradient = t * grad - 1.0 / w
    hessian = t * hessian + tf.linalg.diag(1.0 / (w * w))
    # The Newton step on {sum(step) = 0}: the KKT system, Jacobi-scaled.
    diagonal = tf.sqrt(tf.maximum(tf.linalg.diag_part(hessian), 1e-300))
    border = 1.0 / diagonal
    kkt = tf.concat([
        tf.concat([hessian / tf.einsum("i,j->ij", diagonal, diagonal) +
                   _RIDGE * eye, border[:, None]], axis=1),
        tf.concat([border, tf.zeros([1], tf.float64)], axis=0)[None, :],
    ], axis=0)
    solved = tf.linalg.solve(
        kkt, tf.concat([-gradient / diagonal, tf.zeros([1], tf.float64)],
                       axis=0)[:, None])
    step = solved[:num_tasks, 0] / diagonal
    return step, -tf.reduce_sum(gradient * step)

  def line_search(w, t, step, decrement):
    shrinking = step < 0.0
    to_boundary = tf.reduce_min(tf.where(
        shrinking, -w / tf.where(shrinking, step, -tf.ones_like(step)),
        2.0 * tf.ones_like(step)))
    rate = tf.minimum(0.99 * to_boundary, 1.0)
    start = barrier(w, t)

    def too_long(rate):
      return tf.logical_and(
          barrier(w + rate * step, t) > start - 0.25 * rate * decrement,
          rate >= _SHORTEST_STEP)

    return tf.while_loop(too_long, lambda rate: [rate * 0.5], [rate])[0]

  def body(count, inner, t, w, done):
    del done
    step, decrement = newton_step(w, t)
    centred = 0.5 * decrement <= _CENTRED
    rate = tf.where(centred, tf.zeros_like(t),
                    line_search(w, t, step, decrement))
    # No descent left at this t, or no end to it: the point is taken as
    # centred as float64 allows (t f(w) is large, its rounding hides the
    # decrease); the bound T / t is then a heuristic, not a guarantee.
    centred = tf.logical_or(centred, tf.logical_or(
        rate < _SHORTEST_STEP, inner + 1 >= _CENTRING_LIMIT))
    rate = tf.where(rate < _SHORTEST_STEP, tf.zeros_like(rate), rate)
    moved = w + rate * step
    # Rounding at a very large t could still leave the interior: then the
    # last interior point is the answer.
    inside = tf.logical_and(tf.reduce_all(tf.math.is_finite(moved)),
                            tf.reduce_all(moved > 0.0))
    w = tf.where(inside, moved, w)
    converged = tf.logical_or(tf.logical_not(inside), tf.logical_and(
        centred, num_tasks / t <= _GAP_RELATIVE * objective_size(w) +
        _GAP_FLOOR))
    return (count + 1, tf.where(centred, 0, inner + 1),
            tf.where(centred, t * _BARRIER_GROWTH, t), w, converged)

  count, _, _, weights, _ = tf.while_loop(
      lambda count, inner, t, w, done: tf.logical_and(
          tf.logical_not(done), count < _NEWTON_LIMIT),
      body, (tf.constant(0), tf.constant(0), tf.constant(1.0, tf.float64),
             tf.fill([num_tasks], tf.constant(1.0 / num_tasks, tf.float64)),
             # Nothing to solve for a non-finite matrix (an overflow the
             # step then skips): return the uniform weights at once.
             tf.logical_not(tf.reduce_all(tf.math.is_finite(gram)))))
  # Newton steps keep sum(w) = 1 up to rounding, which accumulates (1e-6
  # after a hundred ill-conditioned steps): back onto the simplex.
  return weights / tf.reduce_sum(weights), count


def simplex_barrier(gram: tf.Tensor, linear: tf.Tensor, norm_weight: tf.Tensor,
                    quadratic: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """Minimises a convex function of g_w = sum_i w_i g_i over the simplex.

  Either |g_w|^2 (`quadratic`: MGDA's min-norm problem) or
  linear . w + norm_weight |g_w| (CAGrad's dual), given only the Gram matrix
  M = G G^T. A log-barrier interior-point method in float64: Newton steps
  with backtracking for t f(w) - sum_i log w_i on {sum w = 1}, t growing
  10x after each centring, until the bound T / t on f(w) - f* is below
  1e-12 of f's size (|f(w)| for MGDA, |linear . w| + norm_weight |g_w| for
  CAGrad, whose two terms can cancel) + 1e-17 (M scaled to a largest
  diagonal entry of 1), or
  until float64 rounding stops progress (then the bound is a heuristic);
  at most 200 Newton steps. Badly scaled tasks cost more steps (norms
  spanning 1e-3 to 1e3: 130 to 175) than equal ones (30 to 120), not less
  accuracy. |g_w| is computed as
  |F^T w| with M = F F^T from the eigendecomposition of the tasks' cosine
  matrix (negative rounding eigenvalues dropped), which keeps it accurate
  down to |g_w| ~ 1e-15 |g|max instead of the ~1e-8 of sqrt(w^T M w), and
  each task's part as precise as its own norm.

  Args:
    gram: [T, T] Gram matrix of the task gradients.
    linear: [T] linear coefficients (ignored when `quadratic`).
    norm_weight: weight of |g_w| (ignored when `quadratic`).
    quadratic: minimise |g_w|^2 instead.

  Returns:
    (weights, newton_steps): the [T] float64 weights and the number of
    Newton steps taken.
  """
  if gram.shape[0] == 1:  # The simplex is one point.
    return tf.ones([1], tf.float64), tf.constant(0)
  return _simplex_barrier(gram, linear, norm_weight, quadratic)
