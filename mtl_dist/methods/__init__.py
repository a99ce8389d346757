"""Training methods: how task losses are weighted and task gradients combined.

- `registry`: the name registries behind `--aggregator` and `--weighting`,
  each method's hyperparameters (`--<method>_<option>` flags), creating a
  method by name, and reading and setting a method's state.
- `aggregators/`: one module per gradient aggregator (the [T, P] task
  Jacobian of the shared variables, or its Gram matrix, to one update), and
  `aggregate`, any of them as a function.
- `weightings/`: one module per loss weighting (the [T] task losses to the
  [T] weights of a step), and `loss_weights`, any of them as a function.

A method registers itself where it is defined; the steps look methods up
by what they declare they need, never by name.
"""

# Registers every method: importing any part of this package lists them all.
from mtl_dist.methods import aggregators  # noqa: F401
from mtl_dist.methods import weightings  # noqa: F401
