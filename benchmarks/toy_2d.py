"""The two-objective 2-D toy of CAGrad, Nash-MTL and FAMO, every aggregator.

Two losses of a 2-D parameter x with a known Pareto set, from the official
code of CAGrad (Liu et al. 2021, `toy.py` of github.com/Cranial-XIX/CAGrad),
as changed by Nash-MTL (Navon et al. 2022, `experiments/toy/` of
github.com/AvivNavon/nash-mtl) and kept by FAMO (Liu et al. 2023,
`experiments/toy/` of github.com/Cranial-XIX/FAMO): the first loss scaled
by 0.1, five starting points, Adam with learning rate 1e-3 on x. Every
registered gradient aggregator runs from each start; the report says which
runs end on the Pareto set, and the figure draws the trajectories.

  python -m benchmarks.toy_2d --output=docs/toy_2d.md --figure=docs/toy_2d.png
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tensorflow as tf

from mtl_dist.methods import aggregators
from mtl_dist.methods import registry

# The starting points of Nash-MTL's and FAMO's `experiments/toy/trainer.py`
# (CAGrad's `toy.py` has three: (-8.5, 7.5), (-8.5, -5), (9, 9)).
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
# The reference code's clamp of the log terms' arguments.
LOWER = 0.000005
# Nash-MTL's and FAMO's `--scale` default: the first loss times 0.1.
SCALE = 0.1
LEARNING_RATE = 1e-3
# torch.optim.Adam's defaults, which the reference code uses.
BETA_1, BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-8
# A run reaches the front when its last iterate is this close (Euclidean,
# in x) to the Pareto set.
TOLERANCE = 0.05
# What the papers report, by aggregator name (the papers' own names in
# parentheses); see docs/toy_2d.md for the figures and files.
PAPERS = {
    "sum": "LS: in Nash-MTL Fig. 1, driven by the larger gradient of l2 "
           "(ends at the l2 end); FAMO Fig. 1: Adam (the mean) misses the "
           "front from 1 of 5 starts",
    "pcgrad": "Nash-MTL Fig. 1: like LS, driven by l2's larger gradient",
    "cagrad": "Nash-MTL Fig. 1: like LS, driven by l2's larger gradient",
    "mgda": "Nash-MTL Fig. 1: reaches the front, biased to the task with "
            "the smaller gradient (l1)",
    "nash_mtl": "Nash-MTL Fig. 1: balanced points on the front from all 5",
    "famo": "FAMO Fig. 1: balanced, reaches the front from all 5 (it is a "
            "weighting there)",
}


def _define_flags() -> None:
  """The script's flags, defined only when it runs as a script: importing
  the module (the tests do) must not define `--output` a second time
  beside another benchmark's."""
  global _OUTPUT, _FIGURE, _STEPS, _RECORD_EVERY, _SCALE, _SEED, _METHODS
  _OUTPUT = flags.DEFINE_string("output", None,
                                "Markdown file to write (default: stdout).")
  _FIGURE = flags.DEFINE_string("figure", None,
                                "PNG file of the trajectories (needs "
                                "matplotlib, the `report` extra).")
  _STEPS = flags.DEFINE_integer("steps", 35000, "Adam steps per run "
                                "(Nash-MTL's 35000; FAMO 50000, CAGrad "
                                "100000).")
  _RECORD_EVERY = flags.DEFINE_integer("record_every", 100,
                                       "Trajectory points every this many "
                                       "steps.")
  _SCALE = flags.DEFINE_float("scale", SCALE, "The first loss's factor "
                              "(Nash-MTL, FAMO: 0.1; CAGrad: 1).")
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the aggregators' draws.")
  _METHODS = flags.DEFINE_list("methods", None,
                               "Aggregators to run (default: every "
                               "registered one).")


def losses(x: tf.Tensor, scale: float = SCALE) -> tf.Tensor:
  """The [2] losses (l1, l2) at x, as the reference code computes them.

  Args:
    x: [2] point (any float dtype).
    scale: The first loss's factor.

  Returns:
    [2] losses of x's dtype.
  """
  x1, x2 = x[0], x[1]
  lower = tf.constant(LOWER, x.dtype)
  zero = tf.constant(0.0, x.dtype)
  log_1 = tf.math.log(tf.maximum(
      tf.abs(0.5 * (-x1 - 7.0) - tf.tanh(-x2)), lower)) + 6.0
  log_2 = tf.math.log(tf.maximum(
      tf.abs(0.5 * (-x1 + 3.0) + tf.tanh(-x2) + 2.0), lower)) + 6.0
  up = tf.maximum(tf.tanh(x2 * 0.5), zero)
  square_1 = ((-x1 + 7.0)**2 + 0.1 * (-x2 - 8.0)**2) / 10.0 - 20.0
  square_2 = ((-x1 - 7.0)**2 + 0.1 * (-x2 - 8.0)**2) / 10.0 - 20.0
  down = tf.maximum(tf.tanh(-x2 * 0.5), zero)
  return tf.stack([scale * (log_1 * up + square_1 * down),
                   log_2 * up + square_2 * down])


def losses_and_jacobian(x: tf.Tensor, scale: float = SCALE
                        ) -> tuple[tf.Tensor, tf.Tensor]:
  """The [2] losses and the [2, 2] Jacobian (row i: grad of loss i) at x."""
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    values = losses(x, scale)
    first, second = values[0], values[1]
  jacobian = tf.stack([tape.gradient(first, x), tape.gradient(second, x)])
  del tape
  return values, jacobian


def stationarity(jacobian: np.ndarray) -> float:
  """|v|, v the min-norm point of the segment [g1, g2] (0: Pareto-stationary).

  For two gradients the minimiser of |w g1 + (1 - w) g2| over w in [0, 1]
  is w = clip((g2 - g1) . g2 / |g1 - g2|^2, 0, 1).

  Args:
    jacobian: [2, P] gradients g1, g2.

  Returns:
    The norm of the min-norm element of their convex hull.
  """
  g1, g2 = np.asarray(jacobian, np.float64)
  gap = g1 - g2
  denominator = float(gap @ gap)
  weight = 1.0 if denominator == 0 else float(
      np.clip(-(gap @ g2) / denominator, 0.0, 1.0))
  return float(np.linalg.norm(weight * g1 + (1.0 - weight) * g2))


def _lower_gradients(x1: np.ndarray, x2: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Closed-form gradients (unscaled) where x2 < 0: (g1, g2), [2, ...] each.

  There the losses are f_i = tanh(-x2 / 2) q_i, q_1 = ((x1 - 7)^2 +
  0.1 (x2 + 8)^2) / 10 - 20, q_2 the same with x1 + 7.
  """
  down = np.tanh(-x2 / 2.0)
  d_down = -0.5 * (1.0 - down**2)
  gradients = []
  for centre in (7.0, -7.0):
    square = ((x1 - centre)**2 + 0.1 * (x2 + 8.0)**2) / 10.0 - 20.0
    gradients.append(np.stack([down * (x1 - centre) / 5.0,
                               d_down * square + down * 0.02 * (x2 + 8.0)]))
  return gradients[0], gradients[1]


def pareto_set(num: int = 2001) -> np.ndarray:
  """[num, 2] points of the Pareto set, x1 from -7 to 7 (float64).

  For x1 in [-7, 7] the two gradients' x1 components have opposite signs,
  so a point is Pareto-stationary where they are parallel: det [g1; g2] = 0
  (the losses' scale does not move that). That curve, x2 from -8.4345 at
  x1 = +-7 to -8.3551 at x1 = 0, is found by bisection on x2 in [-9.5, -7.5]
  (one sign change there for every x1). The papers draw the straight line
  x2 = -8.3552 instead, which meets the set only near x1 = 0.

  Args:
    num: Points along the set.

  Returns:
    The points, x1 increasing.
  """
  x1 = np.linspace(-7.0, 7.0, num)

  def det(x2):
    g1, g2 = _lower_gradients(x1, x2)
    return g1[0] * g2[1] - g1[1] * g2[0]

  low, high = np.full(num, -9.5), np.full(num, -7.5)
  low_sign = np.sign(det(low))
  for _ in range(60):
    middle = 0.5 * (low + high)
    same = np.sign(det(middle)) == low_sign
    low, high = np.where(same, middle, low), np.where(same, high, middle)
  return np.stack([x1, 0.5 * (low + high)], axis=1)


def distance_to_front(point: np.ndarray, front: np.ndarray) -> float:
  """Euclidean distance from `point` [2] to the sampled set `front` [N, 2]."""
  return float(np.min(np.linalg.norm(front - np.asarray(point), axis=1)))


def sub_batches(aggregator: Any) -> int:
  """The aggregator's `sub_batches` K (1 where it does not declare one)."""
  return int(getattr(aggregator, "sub_batches", 1) or 1)


def make_run(aggregator: Any, steps: int, record_every: int,
             scale: float = SCALE, learning_rate: float = LEARNING_RATE):
  """A tf.function x0 -> [records, 2] trajectory, Adam on x in-graph.

  Each step takes the losses and Jacobian at x, the aggregator's update
  (given the losses if it `needs_losses`; with `sub_batches` K > 1 the
  same Jacobian stacked K times, there being no sub-batches in a
  deterministic problem), then Adam's step, written as torch.optim.Adam
  computes it. Records x at step 0, every `record_every` steps, and after
  the last step.

  Args:
    aggregator: From `aggregators.create(name, 2, seed)`.
    steps: Adam steps.
    record_every: Steps between recorded points.
    scale: The first loss's factor.
    learning_rate: Adam's learning rate.

  Returns:
    The function of the float32 [2] start.
  """
  copies = sub_batches(aggregator)

  def update(x, step):
    values, jacobian = losses_and_jacobian(x, scale)
    if copies > 1:
      jacobian = tf.tile(jacobian, [copies, 1])
    return aggregator(jacobian, step,
                      values if aggregator.needs_losses else None)

  full, remainder = divmod(steps, record_every)

  def advance(x, first, second, step, count):
    for _ in tf.range(count):
      direction = tf.cast(update(x, step), tf.float32)
      done = tf.cast(step + 1, tf.float32)
      first = BETA_1 * first + (1.0 - BETA_1) * direction
      second = BETA_2 * second + (1.0 - BETA_2) * direction * direction
      denominator = (tf.sqrt(second) / tf.sqrt(1.0 - BETA_2**done) +
                     ADAM_EPSILON)
      x = x - learning_rate / (1.0 - BETA_1**done) * first / denominator
      step += 1
    return x, first, second, step

  # Trip counts are Python ints, so XLA can compile the loops.
  @tf.function
  def run(start: tf.Tensor) -> tf.Tensor:
    state = (tf.identity(start), tf.zeros_like(start), tf.zeros_like(start),
             tf.constant(0, tf.int64))
    trajectory = tf.TensorArray(tf.float32, size=full + 1 + (remainder > 0))
    trajectory = trajectory.write(0, start)
    for chunk in tf.range(full):
      state = advance(*state, record_every)
      trajectory = trajectory.write(chunk + 1, state[0])
    if remainder:
      state = advance(*state, remainder)
      trajectory = trajectory.write(full + 1, state[0])
    return trajectory.stack()

  return run


@dataclasses.dataclass
class Result:
  """One run: a method from one start."""

  trajectory: np.ndarray  # [records, 2]
  losses: np.ndarray  # [2] at the last point (l1 scaled).
  distance: float  # To the Pareto set.
  stationarity: float  # Of the last point (float64 gradients).
  seconds: float

  @property
  def reached(self) -> bool:
    return bool(np.isfinite(self.distance) and self.distance <= TOLERANCE)


def run_method(name: str, steps: int, record_every: int = 100,
               scale: float = SCALE, seed: int = 0,
               starts: Sequence[Sequence[float]] = STARTS,
               front: Optional[np.ndarray] = None) -> list[Result]:
  """Runs aggregator `name` from each start, a fresh aggregator each time."""
  front = pareto_set() if front is None else front
  results = []
  for start in starts:
    began = time.perf_counter()
    aggregator = aggregators.create(name, 2, seed)
    run = make_run(aggregator, steps, record_every, scale)
    trajectory = run(tf.constant(start, tf.float32)).numpy()
    last = trajectory[-1]
    values, jacobian = losses_and_jacobian(tf.constant(last, tf.float64),
                                           scale)
    finite = bool(np.all(np.isfinite(last)))
    results.append(Result(
        trajectory=trajectory, losses=values.numpy(),
        distance=distance_to_front(last, front) if finite else math.inf,
        stationarity=(stationarity(jacobian.numpy()) if finite
                      else math.inf),
        seconds=time.perf_counter() - began))
  return results


def method_names() -> list[str]:
  """Every registered aggregator but the tests' ("test_..." names)."""
  return [name for name in registry.AGGREGATORS.names()
          if not name.startswith("test_")]


def _cell(result: Result) -> str:
  if not np.all(np.isfinite(result.trajectory[-1])):
    return "diverged"
  mark = "**yes**" if result.reached else "no"
  return (f"{mark} ({result.losses[0]:.2f}, {result.losses[1]:.2f}; "
          f"d {result.distance:.2g}, s {result.stationarity:.1g})")


def _notes(name: str) -> list[str]:
  """How the run used aggregator `name` beyond the plain contract."""
  cls = registry.AGGREGATORS.get(name)
  notes = []
  if getattr(cls, "needs_losses", False):
    notes.append("given the two losses")
  if int(getattr(cls, "sub_batches", 1) or 1) > 1:
    notes.append(f"given the Jacobian stacked {cls.sub_batches} times (no "
                 "sub-batches in a deterministic problem)")
  return notes


def report(results: dict[str, list[Result]], command: str, steps: int,
           scale: float, seconds: float) -> str:
  """The Markdown page."""
  starts = " | ".join(f"({a:g}, {b:g})" for a, b in STARTS)
  lines = [
      "# The 2-D two-objective toy (CAGrad, Nash-MTL, FAMO)",
      "",
      "Made by `" + command + "` on "
      f"{platform.machine()} with {os.cpu_count()} CPU cores, "
      f"{time.strftime('%Y-%m-%d')}; {seconds:.0f} s in all. The figure is "
      "[toy_2d.png](toy_2d.png).",
      "",
      "## The problem",
      "",
      "From `toy.py` of [CAGrad](https://github.com/Cranial-XIX/CAGrad) "
      "(Liu et al. 2021), as changed in `experiments/toy/` of "
      "[Nash-MTL](https://github.com/AvivNavon/nash-mtl) (Navon et al. 2022) "
      "and kept by [FAMO](https://github.com/Cranial-XIX/FAMO) (Liu et al. "
      "2023). With x = (x1, x2), u = max(tanh(x2/2), 0), "
      "d = max(tanh(-x2/2), 0):",
      "",
      "- f1 = u (log max(|(-x1 - 7)/2 - tanh(-x2)|, 5e-6) + 6) + "
      "d (((x1 - 7)^2 + 0.1 (x2 + 8)^2)/10 - 20)",
      "- f2 = u (log max(|(3 - x1)/2 + tanh(-x2) + 2|, 5e-6) + 6) + "
      "d (((x1 + 7)^2 + 0.1 (x2 + 8)^2)/10 - 20)",
      f"- the losses optimised are l1 = {scale:g} f1 and l2 = f2 (Nash-MTL "
      "and FAMO scale the first loss by 0.1 so the tasks' gradients differ "
      "in size; CAGrad does not).",
      "",
      "Settings, as in the reference code: float32; Adam on x with learning "
      f"rate {LEARNING_RATE:g}, betas (0.9, 0.999), eps 1e-8 (torch's "
      f"defaults), written out in TensorFlow; {steps} steps per run; the "
      "aggregator's update is Adam's gradient; a fresh aggregator "
      "(`mtl_dist.methods.aggregators.create(name, 2, seed)`) for each "
      "start, stepped with the 0-based step number. The whole run is one "
      "`tf.function` with in-graph loops; x is recorded every "
      "`--record_every` steps for the figure.",
      "",
      "| | CAGrad `toy.py` | Nash-MTL `experiments/toy/trainer.py` | "
      "FAMO `experiments/toy/trainer.py` | here |",
      "|---|---|---|---|---|",
      "| starts | (-8.5, 7.5), (-8.5, -5), (9, 9) | the five below | the "
      "five below | the five below |",
      f"| scale of f1 | 1 | 0.1 (`--scale`) | 0.1 | {scale:g} |",
      f"| steps | 100000 | 35000 | 50000 | {steps} |",
      "| optimiser | Adam 1e-3 | Adam 1e-3 | Adam 1e-3 | Adam 1e-3 |",
      "",
      "## Reaching the Pareto front",
      "",
      "The Pareto set is computed, not read off the papers' plots: where "
      "x2 < 0 both losses are tanh(-x2/2) q_i(x) with q_i quadratic, and for "
      "x1 in [-7, 7] their gradients point opposite ways in x1, so the set "
      "is where the two gradients are antiparallel, det [g1; g2] = 0: a curve "
      "from x2 = -8.4345 at x1 = +-7 to x2 = -8.3551 at x1 = 0 "
      "(`pareto_set`, bisection in float64; the papers draw the straight "
      "line x2 = -8.3552, which is this curve only near x1 = 0). A run "
      f"**reaches the front** if its last iterate is within {TOLERANCE:g} "
      "(Euclidean, in x) of that set. Each cell gives (l1, l2) at the last "
      "iterate; d, its distance to the set; and s, its Pareto-stationarity: "
      "the norm of the min-norm point of the segment [g1, g2] of the "
      "gradients of l1 and l2 (0 on the set; computed in float64, "
      "independently of d). Pareto-stationary is not enough: a point where "
      "one loss's log term is clamped has that loss's gradient 0 (s = 0) "
      "without being on the front.",
      "",
  ]
  if steps < 35000:
    lines += [
        f"**{steps} steps is fewer than any paper's (35000 to 100000):** "
        "a run still moving towards the set (small d, falling s) counts as "
        "not reached. Re-run with the default `--steps` for the papers' "
        "length.",
        "",
    ]
  lines += [
      "| aggregator | " + starts + " | reached | the papers |",
      "|---|" + "---|" * (len(STARTS) + 2),
  ]
  for name, runs in results.items():
    notes = _notes(name)
    label = f"`{name}`" + (f" ({'; '.join(notes)})" if notes else "")
    lines.append(
        f"| {label} | " + " | ".join(_cell(r) for r in runs) +
        f" | {sum(r.reached for r in runs)}/{len(runs)} | "
        f"{PAPERS.get(name, 'not in these papers')} |")
  lines += [
      "",
      "## What the papers report",
      "",
      "- CAGrad (Liu et al. 2021), Fig. 1 and the README's animation: "
      "Adam on the mean loss (`sgd` in `toy.py`), MGDA (`mgd`), PCGrad and "
      "CAGrad (c = 0.5) from three starts, f1 unscaled, 100000 steps "
      "(`toy.py`). As we recall the figure (its caption could not be "
      "retrieved here), only CAGrad reaches the minimum of the average loss "
      "(the star at (0, -8.3552)) from all three starts; the mean gets "
      "stuck away from the front from some, MGDA and PCGrad stop at other "
      "points of the front.",
      "- Nash-MTL (Navon et al. 2022), Fig. 1 (`misc/toy_pareto_2d.png` in "
      "its repository), loss space, f1 scaled by 0.1, five starts: for LS, "
      "PCGrad and CAGrad \"the optimization process is controlled by the "
      "gradient of l2, since it has a larger magnitude\" (quoted); as we "
      "recall the rest of the caption, MGDA is biased to the task with the "
      "smaller gradient and Nash-MTL reaches balanced points of the front "
      "from all five.",
      "- FAMO (Liu et al. 2023), Fig. 1 (`misc/fig.png` in its repository; "
      "same problem and starts, 50000 steps): \"ADAM fails in 1 out of 5 "
      "runs to reach the Pareto front due to CG\"; FAMO (a loss weighting, "
      "gamma = 0 and the losses' minima set to (-2.1, -21) in "
      "`experiments/toy/run.sh` and `trainer.py`) reaches it from all 5.",
      "",
      "Differences from the reference runs: the update directions here are "
      "this package's aggregators (e.g. `sum` is the sum, not the mean, of "
      "the gradients: the same for Adam up to eps; PCGrad's order is drawn "
      "per step; CAGrad solves its dual exactly and divides by 1 + c^2, "
      "`toy.py` by 1 + c); and the gradients come from TensorFlow, where "
      "`tf.maximum` passes the gradient at a tie as `torch.clamp` does.",
      "",
      "The methods given the losses assume positive ones, as training "
      "losses are: MoCo multiplies each unit gradient by its loss and "
      "DB-MTL follows the gradients of log L_i (its losses floored at 0). "
      "This problem's losses are negative over most of the plane (down to "
      "-20 at the front), where MoCo's tracked gradients point uphill for "
      "the task whose loss is negative and DB-MTL's logarithm is of the "
      "floor; their rows show the methods outside their assumptions, not "
      "their behaviour on training losses.",
      "",
  ]
  return "\n".join(lines)


def plot(results: dict[str, list[Result]], path: str, scale: float,
         front: Optional[np.ndarray] = None) -> None:
  """One panel per aggregator: l1 + l2 contours, the set, the trajectories.

  Args:
    results: Runs by aggregator.
    path: PNG to write.
    scale: The first loss's factor.
    front: The sampled Pareto set (default: `pareto_set()`).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top

  front = pareto_set() if front is None else front
  grid = np.linspace(-10.0, 10.0, 201)
  xs, ys = np.meshgrid(grid, grid)
  points = tf.constant(np.stack([xs.ravel(), ys.ravel()]), tf.float64)
  total = tf.reduce_sum(losses(points, scale), axis=0).numpy().reshape(
      xs.shape)
  columns = min(4, len(results))
  rows = math.ceil(len(results) / columns)
  figure, axes = pyplot.subplots(rows, columns, squeeze=False,
                                 figsize=(3.6 * columns, 3.6 * rows))
  colours = pyplot.get_cmap("tab10")
  for axis, (name, runs) in zip(axes.ravel(), results.items()):
    axis.contour(xs, ys, total, levels=20, cmap="viridis", linewidths=0.6)
    axis.plot(front[:, 0], front[:, 1], color="0.5", linewidth=5, zorder=1,
              label="Pareto set")
    for i, run in enumerate(runs):
      path_ = run.trajectory
      axis.plot(path_[:, 0], path_[:, 1], color=colours(i), linewidth=1.2,
                zorder=3)
      axis.plot(*path_[0], "o", color="k", markersize=4, zorder=4)
      if np.all(np.isfinite(path_[-1])):
        axis.plot(*path_[-1], "*" if run.reached else "X", color=colours(i),
                  markersize=9, markeredgecolor="k", zorder=5)
    reached = sum(r.reached for r in runs)
    axis.set_title(f"{name}: {reached}/{len(runs)} reach", fontsize=10)
    axis.set_xlim(-10, 10)
    axis.set_ylim(-10, 10)
    axis.set_aspect("equal")
    axis.tick_params(labelsize=7)
  for axis in axes.ravel()[len(results):]:
    axis.axis("off")
  figure.suptitle("x-space; contours of l1 + l2, gray: Pareto set, "
                  "dots: starts, *: reached, X: not", fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=90)
  pyplot.close(figure)


def main(argv: list[str]) -> None:
  del argv
  known = method_names()
  chosen = _METHODS.value or known
  unknown = [m for m in chosen if m not in known]
  if unknown:
    raise app.UsageError(f"--methods: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(known)})")
  if _STEPS.value < 1 or _RECORD_EVERY.value < 1:
    raise app.UsageError("--steps and --record_every must be positive")
  front = pareto_set()
  began = time.perf_counter()
  results = {}
  for name in chosen:
    results[name] = run_method(name, _STEPS.value, _RECORD_EVERY.value,
                               _SCALE.value, _SEED.value, front=front)
    print(f"{name}: reached {sum(r.reached for r in results[name])}/"
          f"{len(STARTS)} in "
          f"{sum(r.seconds for r in results[name]):.0f} s", file=sys.stderr)
  seconds = time.perf_counter() - began
  command = "python -m benchmarks.toy_2d " + " ".join(
      f"--{name}={flags.FLAGS[name].value}"
      for name in ("steps", "record_every", "scale", "seed"))
  if _METHODS.value:
    command += " --methods=" + ",".join(_METHODS.value)
  text = report(results, command, _STEPS.value, _SCALE.value, seconds)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)
  else:
    print(text)
  if _FIGURE.value:
    plot(results, _FIGURE.value, _SCALE.value, front)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
