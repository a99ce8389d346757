"""Train and eval steps: what happens on one replica for one batch.

- `losses`: task losses as shares of the global-batch mean, label checks and
  counts, regularization, evaluation sums;
- `plumbing`: what every train step shares: the fused all-reduce, the
  finite check, the conditional update, flattening;
- `joint`: `JointStep`, every task on one batch, weighted and aggregated;
- `alternate`: `AlternateStep`, one scheduled task per step.

Joint and alternate mode share the model, the pipelines and the loop; they
differ only here. Every loss is a per-example loss summed and divided by the
global batch size (`losses.average_loss`), so the gradients summed over N
replicas equal the gradient of one device with the same global batch.
"""
