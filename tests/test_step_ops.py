"""What one compiled step is made of: per-step checks stay a few ops.

On small models a step's cost is its op count (docs/benchmarks.md); these
tests keep the checks and the optimizer's scalars from growing back to one
op group per variable or per assertion. The counts are exact: a new assert
or `tf.pow` in the step must be counted here on purpose.
"""

import collections

import pytest
import tensorflow as tf

import mtl_dist


def _loop_op_types(trainer, iterators,
                   loop: str = "_train_loop") -> collections.Counter:
  """Op types of a train loop, counted through every function it calls."""
  function = getattr(trainer, loop).get_concrete_function(
      tuple(iterators), tf.constant(1, tf.int64))
  graph_def = function.graph.as_graph_def()
  library = {f.signature.name: f for f in graph_def.library.function}
  counts = collections.Counter()

  def visit(nodes):
    for node in nodes:
      counts[node.op] += 1
      called = [node.attr[key].func.name
                for key in ("body", "cond", "then_branch", "else_branch", "f")
                if key in node.attr]
      if "branches" in node.attr:
        called += [f.name for f in node.attr["branches"].list.func]
      for name in called:
        if name in library:
          visit(library[name].node_def)

  visit(graph_def.node)
  return counts


@pytest.mark.parametrize("mode, task_names, updates", [
    ("joint", ("shape", "scale", "x", "y"), 1),
    ("alternate", ("shape", "x"), 2),  # One optimizer per task.
])
def test_one_label_check_and_one_set_of_adam_scalars_per_update(
    build_trainer, mode, task_names, updates):
  # jit_compile=False: tf_keras compiles each variable's update on its own
  # when a GPU is present, and nothing is shared then.
  trainer, iterators, _, _ = build_trainer(
      1, mode, task_names, optimizer_factory=lambda: mtl_dist.FusedAdam(
          learning_rate=1e-3, jit_compile=False))
  # Alternate round robin: the switched loop and the round loop (each task's
  # step once, no switch) hold the same steps.
  loops = ["_train_loop"] + (["_cycles_loop"] if mode == "alternate" else [])
  model = trainer.model
  updated = (model.trainable_variables if mode == "joint" else
             [v for name in task_names
              for v in model.trunk_and_head_variables(name)])
  for loop in loops:
    counts = _loop_op_types(trainer, iterators, loop)
    # One assertion, for the one classification task ("shape"); no checks
    # of the constant batch size (tf.nn.compute_average_loss adds three per
    # task).
    assert counts["Assert"] == 1, loop
    # beta_1^t and beta_2^t once per optimizer update, not per variable.
    assert counts["Pow"] == 2 * updates, loop
    assert counts["ResourceApplyAdam"] == len(updated), loop
  trainer.train(iterators, 3)  # And the loop runs.
  assert int(trainer.global_step.numpy()) == 3
