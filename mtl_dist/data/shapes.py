"""`shapes`: a procedurally generated, dSprites-like multi-label image set.

32x32 grayscale images of a square, an ellipse or a heart at a random scale,
rotation and position, made from a seed with NumPy (no download). Each
example carries five labels: `shape` (3 classes) and the regressions `scale`,
`orientation`, `x`, `y`, each normalised to [0, 1].
"""

from __future__ import annotations

import numpy as np

from mtl_dist import tasks as tasks_lib

IMAGE_SIZE = 32
SHAPE_NAMES = ("square", "ellipse", "heart")
TASKS = (
    tasks_lib.TaskSpec("shape", tasks_lib.CLASSIFICATION,
                       num_classes=len(SHAPE_NAMES)),
    tasks_lib.TaskSpec("scale", tasks_lib.REGRESSION, size=1),
    tasks_lib.TaskSpec("orientation", tasks_lib.REGRESSION, size=1),
    tasks_lib.TaskSpec("x", tasks_lib.REGRESSION, size=1),
    tasks_lib.TaskSpec("y", tasks_lib.REGRESSION, size=1),
)
TASK_NAMES = tuple(task.name for task in TASKS)

# Half-size of a shape in pixels at scale 0 and 1, the rotation range (the
# square repeats every 90 degrees, so a 45-degree range keeps every label
# recoverable from the picture), and the range of centre positions, chosen so
# that the largest rotated shape stays inside the image.
_MIN_HALF_SIZE, _MAX_HALF_SIZE = 4.0, 8.0
_MAX_ROTATION = np.pi / 4
_MIN_CENTRE, _MAX_CENTRE = 10.0, 22.0
_SUPERSAMPLE = 2  # Sub-pixel samples per axis, for soft (anti-aliased) edges.
_CHUNK = 1024


def generate(num_examples: int,
             seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Makes `num_examples` images and their labels from `seed`.

  The same (num_examples, seed) always gives the same arrays, and the first k
  examples do not depend on num_examples, so splits cut from one call are
  disjoint and stable.

  Args:
    num_examples: How many examples to make.
    seed: The random seed.

  Returns:
    (images float32 [N, 32, 32, 1] in [0, 1], labels) where labels maps
    `shape` to int32 [N] and every regression task to float32 [N, 1].
  """
  rng = np.random.default_rng(seed)
  # One row of draws per example, so example i depends on i alone.
  draws = rng.uniform(0.0, 1.0, size=(num_examples, 5))
  shape = np.minimum(draws[:, 0] * len(SHAPE_NAMES),
                     len(SHAPE_NAMES) - 1).astype(np.int32)
  factors = draws[:, 1:].astype(np.float32)
  scale, orientation, x, y = (factors[:, i] for i in range(4))
  images = np.empty((num_examples, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
  for start in range(0, num_examples, _CHUNK):
    part = slice(start, start + _CHUNK)
    images[part, :, :, 0] = _render(shape[part], scale[part],
                                    orientation[part], x[part], y[part])
  labels = {"shape": shape}
  for name, values in (("scale", scale), ("orientation", orientation),
                       ("x", x), ("y", y)):
    labels[name] = values[:, None]
  return images, labels


def _render(shape: np.ndarray, scale: np.ndarray, orientation: np.ndarray,
            x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Rasterises one chunk of shapes with supersampled coverage."""
  n = _SUPERSAMPLE
  offsets = ((np.arange(IMAGE_SIZE * n) + 0.5) / n).astype(np.float32)
  half = _MIN_HALF_SIZE + (_MAX_HALF_SIZE - _MIN_HALF_SIZE) * scale
  angle = _MAX_ROTATION * orientation
  centre_x = _MIN_CENTRE + (_MAX_CENTRE - _MIN_CENTRE) * x
  centre_y = _MIN_CENTRE + (_MAX_CENTRE - _MIN_CENTRE) * y
  inside = np.empty((len(shape), IMAGE_SIZE * n, IMAGE_SIZE * n), bool)
  for shape_id, contains in enumerate((_in_square, _in_ellipse, _in_heart)):
    rows = np.flatnonzero(shape == shape_id)
    if not rows.size:
      continue
    dx = offsets[None, None, :] - centre_x[rows, None, None]
    dy = offsets[None, :, None] - centre_y[rows, None, None]
    cos = np.cos(angle[rows])[:, None, None] / half[rows, None, None]
    sin = np.sin(angle[rows])[:, None, None] / half[rows, None, None]
    # Shape coordinates: the pixel offset rotated back and divided by size.
    inside[rows] = contains(cos * dx + sin * dy, cos * dy - sin * dx)
  coverage = inside.reshape(len(shape), IMAGE_SIZE, n, IMAGE_SIZE, n)
  return coverage.mean(axis=(2, 4), dtype=np.float32)


def _in_square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return np.maximum(np.abs(u), np.abs(v)) <= 0.8


def _in_ellipse(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  return u * u + (v / 0.55)**2 <= 1.0


def _in_heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  # The heart curve (a^2 + b^2 - 1)^3 - a^2 b^3 <= 0, upright in the image.
  a, b = 1.15 * u, 0.15 - 1.15 * v
  a2 = a * a
  return (a2 + b * b - 1.0)**3 <= a2 * b**3


def drop_labels(labels: dict[str, np.ndarray], fractions: dict[str, float],
                num_examples: int, seed: int) -> dict[str, np.ndarray]:
  """Marks labels of the first `num_examples` examples as missing.

  For each task in `fractions`, a seeded random subset keeps its label (that
  fraction of the examples) and the rest are set to missing: -1 for
  classification, NaN for regression. Examples past `num_examples` (the
  eval split) keep every label.

  Args:
    labels: Task name to labels, as returned by `generate`.
    fractions: Task name to the fraction of examples that keep the label.
    num_examples: How many leading examples to thin out.
    seed: The random seed.

  Returns:
    New label arrays; the inputs are not modified.
  """
  result = dict(labels)
  for i, (name, fraction) in enumerate(sorted(fractions.items())):
    rng = np.random.default_rng([seed, 1 + i])
    missing = rng.uniform(size=num_examples) >= fraction
    values = labels[name].copy()
    integer = np.issubdtype(values.dtype, np.integer)
    values[:num_examples][missing] = -1 if integer else np.nan
    result[name] = values
  return result


def default_task_sizes(task_names: list[str]) -> dict[str, int]:
  """Per-task dataset sizes for alternate mode: halving from 8192 down.

  The first task gets 8192 examples, the next 4096, and so on (at least 256),
  so the datasets are several-fold apart as in real multi-task collections.
  """
  return {name: max(8192 >> i, 256) for i, name in enumerate(task_names)}
