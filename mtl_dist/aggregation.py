"""Gradient aggregation over tasks: PCGrad, CAGrad, MGDA, all in-graph.

Every function takes the per-task gradients of the shared parameters as one
[T, P] matrix (row i: task i's gradient, already summed over all replicas)
and returns the update direction [P]. Because the input is the same on every
replica and the computation is deterministic, every replica applies the same
update, and N replicas equal one device.

Formulas:
  PCGrad (Yu et al. 2020): for each task i, over the other tasks j in a
    random order, if g_i . g_j < 0 then g_i -= (g_i . g_j / |g_j|^2) g_j;
    the update is sum_i g_i.
  MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the
    task gradients.
  CAGrad (Liu et al. 2021): g0 = mean_i g_i; w* = argmin over the simplex of
    g_w . g0 + c |g0| |g_w| with g_w = sum_i w_i g_i; the update is
    (g0 + c |g0| / |g_w*| g_w*) / (1 + c^2).

MGDA's and CAGrad's problems over the task simplex are solved exactly (to
float64 on the float32 Gram matrix) by one interior-point method,
`simplex_barrier`.
"""

from __future__ import annotations

import tensorflow as tf

_EPSILON = 1e-12
_FLOAT32_EPSILON = 2.0**-23
_VANISHING = 1e-8  # |g_w| / max_i |g_i| below which CAGrad's g_w is 0.


def conflict_share(grads: tf.Tensor) -> tf.Tensor:
  """The share of task pairs whose gradients conflict (negative cosine)."""
  return conflict_share_from_gram(
      tf.linalg.matmul(grads, grads, transpose_b=True))


def conflict_share_from_gram(gram: tf.Tensor) -> tf.Tensor:
  """`conflict_share` from the [T, T] Gram matrix of the gradients."""
  num_tasks = gram.shape[0]
  if num_tasks < 2:
    return tf.constant(0.0)
  upper = tf.linalg.band_part(tf.ones_like(gram), 0, -1) - tf.eye(num_tasks)
  conflicts = tf.cast(gram < 0, tf.float32) * upper
  return tf.reduce_sum(conflicts) / (num_tasks * (num_tasks - 1) / 2)


def pcgrad(grads: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """PCGrad's update: conflicting components projected out, then summed.

  Args:
    grads: [T, P] per-task gradients.
    seed: int64 [2] seed of the random task orders (e.g. (seed, step)), so
      that every replica and worker draws the same orders.

  Returns:
    The [P] update.
  """
  num_tasks = grads.shape[0]
  squared_norms = tf.reduce_sum(grads * grads, axis=1)
  projected = []
  for i in range(num_tasks):
    others = tf.constant([j for j in range(num_tasks) if j != i], tf.int32)
    order = tf.random.experimental.stateless_shuffle(
        others, seed=tf.stack([seed[0], seed[1] * num_tasks + i]))
    g_i = grads[i]
    for k in range(num_tasks - 1):
      j = order[k]
      g_j = tf.gather(grads, j)
      dot = tf.reduce_sum(g_i * g_j)
      coefficient = tf.where(
          dot < 0, dot / tf.maximum(tf.gather(squared_norms, j), _EPSILON),
          0.0)
      g_i = g_i - coefficient * g_j
    projected.append(g_i)
  return tf.add_n(projected)


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
    w = w + rate * step
    converged = tf.logical_and(
        centred, num_tasks / t <= _GAP_RELATIVE * tf.abs(objective(w)) +
        _GAP_FLOOR)
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
  return weights, count


def simplex_barrier(gram: tf.Tensor, linear: tf.Tensor, norm_weight: tf.Tensor,
                    quadratic: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """Minimises a convex function of g_w = sum_i w_i g_i over the simplex.

  Either |g_w|^2 (`quadratic`: MGDA's min-norm problem) or
  linear . w + norm_weight |g_w| (CAGrad's dual), given only the Gram matrix
  M = G G^T. A log-barrier interior-point method in float64: Newton steps
  with backtracking for t f(w) - sum_i log w_i on {sum w = 1}, t growing
  10x after each centring, until the bound T / t on f(w) - f* is below
  1e-12 |f(w)| + 1e-17 (M scaled to a largest diagonal entry of 1), or
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


def min_norm_weights(gram: tf.Tensor) -> tf.Tensor:
  """Weights w on the simplex minimising |sum_i w_i g_i| (MGDA's problem).

  Solved by `simplex_barrier` on |g_w|^2. Tested against enumerating every
  face of the simplex in float64 (tests/test_aggregation.py): the min-norm
  point agrees to 1e-6 |g|max (and 1e-3 of its own norm) for 3 to 10 tasks
  whose norms span 1e-3 to 1e3, and is within 1e-6 |g|max of 0 when 0 is
  in the hull.

  Args:
    gram: [T, T] Gram matrix of the task gradients, G G^T.

  Returns:
    The [T] float32 weights.
  """
  num_tasks = gram.shape[0]
  weights, _ = simplex_barrier(gram, tf.zeros([num_tasks]), 0.0, True)
  return tf.cast(weights, tf.float32)


def mgda(grads: tf.Tensor) -> tf.Tensor:
  """MGDA's update: the min-norm point of the convex hull of the gradients."""
  return _combine("mgda", grads)


NAMES = ("sum", "pcgrad", "cagrad", "mgda")
GRAM_AGGREGATORS = ("mgda", "cagrad")


def aggregate(name: str, grads: tf.Tensor, seed: tf.Tensor,
              cagrad_c: float = 0.5) -> tf.Tensor:
  """The update of aggregator `name` (not "sum") from the [T, P] gradients.

  Args:
    name: "pcgrad", "cagrad" or "mgda".
    grads: [T, P] per-task gradients, summed over replicas.
    seed: int64 [2] seed of PCGrad's task orders.
    cagrad_c: CAGrad's c.

  Returns:
    The [P] update.
  """
  if name == "pcgrad":
    return pcgrad(grads, seed)
  return _combine(name, grads, cagrad_c)


def _combine(name: str, grads: tf.Tensor, cagrad_c: float = 0.5) -> tf.Tensor:
  """The update of a Gram-matrix aggregator from the [T, P] gradients."""
  if name == "cagrad":
    return cagrad(grads, cagrad_c)
  gram = tf.linalg.matmul(grads, grads, transpose_b=True)
  return tf.linalg.matvec(grads, coefficients_from_gram(name, gram, cagrad_c),
                          transpose_a=True)


def coefficients_from_gram(name: str, gram: tf.Tensor,
                           cagrad_c: float = 0.5) -> tf.Tensor:
  """The [T] coefficients a with update = sum_i a_i g_i, from G G^T alone.

  MGDA's and CAGrad's updates are linear combinations of the task gradients
  whose coefficients depend only on the Gram matrix, so they can be computed
  from gradients at the shared representation instead (MGDA-UB, --rep_grad)
  and the combination backpropagated through the trunk once. PCGrad's
  sequential projections have no such form.

  Args:
    name: "mgda" or "cagrad".
    gram: [T, T] Gram matrix of the task gradients.
    cagrad_c: CAGrad's c.

  Returns:
    The coefficients.
  """
  if name == "mgda":
    return min_norm_weights(gram)
  if name == "cagrad":
    num_tasks = gram.shape[0]
    weights = cagrad_weights(gram, cagrad_c)
    g0_norm = tf.sqrt(tf.maximum(tf.reduce_sum(gram), 0.0)) / num_tasks
    g_w_norm = tf.sqrt(tf.maximum(
        tf.reduce_sum(weights * tf.linalg.matvec(gram, weights)), 0.0))
    # From the Gram matrix alone |g_w|^2 has float32 rounding of M's
    # entries: |g_w| below sqrt(epsilon) x sum_i w_i |g_i| is noise.
    scale = _cagrad_scale(g0_norm, g_w_norm, weights, gram, cagrad_c,
                          _FLOAT32_EPSILON**0.5)
    return (1.0 / num_tasks + scale * weights) / (1.0 + cagrad_c * cagrad_c)
  raise ValueError(f"{name!r} has no Gram-matrix form (known: "
                   f"{', '.join(GRAM_AGGREGATORS)})")


def cagrad_weights(gram: tf.Tensor, c: float) -> tf.Tensor:
  """CAGrad's dual: argmin over the simplex of w.b + c|g0| |g_w|.

  b = M 1 / T (so w.b = g_w . g0) and |g0| = sqrt(1^T M 1) / T, M the Gram
  matrix. Solved by `simplex_barrier`; its duality gap is checked in the
  tests for 3 to 10 tasks whose norms span 1e-3 to 1e3.

  Args:
    gram: [T, T] Gram matrix of the task gradients.
    c: CAGrad's c.

  Returns:
    The [T] float32 weights.
  """
  num_tasks = gram.shape[0]
  gram = tf.cast(gram, tf.float32)
  g0_norm = tf.sqrt(tf.maximum(tf.reduce_sum(gram), 0.0)) / num_tasks
  weights, _ = simplex_barrier(gram, tf.reduce_sum(gram, axis=1) / num_tasks,
                               c * g0_norm, False)
  return tf.cast(weights, tf.float32)


def _cagrad_scale(g0_norm: tf.Tensor, g_w_norm: tf.Tensor, weights: tf.Tensor,
                  gram: tf.Tensor, c: float, relative: float) -> tf.Tensor:
  """c|g0| / |g_w|, or 0 where |g_w| is noise.

  Noise is the rounding of g_w, `relative` x sum_i w_i |g_i|, or the
  solver's residue: at an optimum with g_w = 0 the barrier leaves weights
  ~1/t on the other tasks and smooths |g_w| below ~1e-10 |g|max, so
  |g_w| < 1e-8 |g|max counts as 0.
  """
  norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
  vanishes = g_w_norm <= (relative * tf.reduce_sum(weights * norms) +
                          _VANISHING * tf.reduce_max(norms))
  return tf.where(vanishes, 0.0,
                  c * g0_norm / tf.where(vanishes, 1.0, g_w_norm))


def cagrad(grads: tf.Tensor, c: float = 0.5) -> tf.Tensor:
  """CAGrad's update (g0 + c|g0| g_w/|g_w|) / (1 + c^2) at the dual optimum.

  |g0| and |g_w| are the norms of the vectors themselves, so the update is
  inside the ball |d - g0 / (1 + c^2)| <= c|g0| / (1 + c^2) for every
  input. Where the optimum has g_w = 0 (0 in the tasks' hull and no
  direction that helps: exactly cancelling or mirrored tasks), g_w / |g_w|
  has no limit; the update is then g0 / (1 + c^2), the formula without its
  undefined term (TorchJD returns 0 there, the official code a direction of
  rounding noise). |g_w| counts as 0 below T x float32's epsilon x
  sum_i w_i |g_i|, the rounding of the sum that forms g_w.
  """
  num_tasks = grads.shape[0]
  gram = tf.linalg.matmul(grads, grads, transpose_b=True)
  weights = cagrad_weights(gram, c)
  g0 = tf.reduce_mean(grads, axis=0)
  g_w = tf.linalg.matvec(grads, weights, transpose_a=True)
  scale = _cagrad_scale(tf.norm(g0), tf.norm(g_w), weights, gram, c,
                        num_tasks * _FLOAT32_EPSILON)
  return (g0 + scale * g_w) / (1.0 + c * c)
