"""`toy_regression`: the synthetic benchmark of the GradNorm paper.

Chen et al. 2018, section 4: T regression tasks on shared inputs,
f_i(x) = sigma_i * tanh((B + eps_i) x), with x in R^250, outputs in R^100,
B and eps_i matrices with elements drawn i.i.d. from N(0, 10) and N(0, 3.5)
(variances), and scales sigma_i spread over orders of magnitude, so that the
tasks' losses differ by up to sigma_max^2 / sigma_min^2. Here sigma_i runs
log-uniformly from 1 to 100 over T = 10 tasks. Inputs are normal with
variance 1 / (250 * 13.5), so that (B + eps_i) x has unit variance and the
tanh works in its nonlinear range rather than as a sign function.
"""

from __future__ import annotations

import numpy as np

from mtl_dist import tasks as tasks_lib

NUM_TASKS = 10
INPUT_SIZE = 250
OUTPUT_SIZE = 100
SIGMAS = tuple(float(s) for s in np.logspace(0.0, 2.0, NUM_TASKS))
TASK_NAMES = tuple(f"f{i}" for i in range(NUM_TASKS))
TASKS = tuple(tasks_lib.TaskSpec(name, tasks_lib.REGRESSION,
                                 size=OUTPUT_SIZE)
              for name in TASK_NAMES)


def generate(num_examples: int,
             seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Inputs [N, 250] and each task's targets [N, 100], from `seed`.

  The task functions (B, eps_i) depend on `seed` only, and example k's input
  on (seed, k) only, so splits cut from one call are disjoint and stable.
  """
  functions = np.random.default_rng([seed, 0])
  base = functions.normal(0.0, np.sqrt(10.0), (OUTPUT_SIZE, INPUT_SIZE))
  inputs = np.random.default_rng([seed, 1]).normal(
      size=(num_examples, INPUT_SIZE)) / np.sqrt(INPUT_SIZE * 13.5)
  labels = {}
  for name, sigma in zip(TASK_NAMES, SIGMAS):
    noise = functions.normal(0.0, np.sqrt(3.5), (OUTPUT_SIZE, INPUT_SIZE))
    labels[name] = (sigma * np.tanh(inputs @ (base + noise).T)).astype(
        np.float32)
  return inputs.astype(np.float32), labels
