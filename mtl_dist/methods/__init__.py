"""Training methods: how task losses are weighted and task gradients combined.

- `catalog`: every method's name, summary and hyperparameters (the
  `--<method>_<option>` flags) and what the configuration checks read, with
  no TensorFlow: what `--aggregator` and `--weighting` offer.
- `registry`: each catalogued name's `tf.Module` class, creating a method by
  name, and reading and setting a method's state.
- `aggregators/`: one module per gradient aggregator (the [T, P] task
  Jacobian of the shared variables, or its Gram matrix, to one update), and
  `aggregate`, any of them as a function.
- `weightings/`: one module per loss weighting (the [T] task losses to the
  [T] weights of a step), and `loss_weights`, any of them as a function.
- `schedule_settings` (no TensorFlow) and `schedules`: alternate mode's
  task schedules.

A method is its catalogue entry plus its module, whose class registers
itself under the entry's name; the steps look methods up by what they
declare they need, never by name. Importing this package imports no
method: `registry` imports them all when a class is first looked up.
"""
