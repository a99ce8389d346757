"""The catalogue of training methods: what flags and checks know of each.

Every loss weighting and gradient aggregator has one entry here: its name
(the value of `--weighting` or `--aggregator`), a few words for the flag's
help, its hyperparameters (`Option`s, each the flag `--<method>_<option>`,
e.g. `--cagrad_c`, valid only with its method; its default lives in the
option alone), and the declarations the configuration checks read
(`has_gram_form` for `--rep_grad`, `sub_batches` for the batch size and
`--jit_compile`, `needs_losses` for `--jit_compile`).

This module imports no TensorFlow, so a launcher defines and checks every
method's flags before TensorFlow starts. A method's math is a `tf.Module`
class of the same name in `aggregators/<name>.py` or `weightings/<name>.py`;
registering it (`registry.AGGREGATORS.register`) gives it its entry's
`summary` and `options`, and refuses a class whose declarations differ
from its entry or that has no entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

from mtl_dist import errors

AGGREGATOR = "aggregator"
WEIGHTING = "weighting"
# No method option is meaningful beyond this magnitude; 1e300 or inf would
# only turn the run's numbers into NaN later, blamed on the data.
MAX_OPTION = 1e6
# Defaults the math modules share with their options.
# TorchJD's ridge on the trace-normalised Gram matrix (UPGrad, DualProj).
DUAL_CONE_REG_EPS = 1e-4
# The ridge on the gradients' cosine matrix of Nash-MTL and FairGrad.
BARGAINING_REG_EPS = 1e-8
# LibMTL's SGD learning rate of SDMGrad's weights.
SDMGRAD_LEARNING_RATE = 5.0


@dataclasses.dataclass(frozen=True)
class Option:
  """A hyperparameter of a method.

  Attributes:
    name: The option's name; its flag is `--<method>_<name>`.
    default: The paper's value; its type (int or float) is the option's.
    help: What it sets, for `--helpfull`.
    minimum: The least allowed value (None: any).
    strict: The value must exceed `minimum` (a "positive" option).
    maximum: The largest allowed value (None: any).
  """

  name: str
  default: Any
  help: str
  minimum: Optional[float] = None
  strict: bool = False
  maximum: Optional[float] = None

  def check(self, flag: str, value: Any) -> None:
    """Raises ConfigError naming `--flag=value` if the value is not allowed."""
    kind = type(self.default)
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
      raise errors.ConfigError(f"--{flag}={value}: must be an integer")
    if not abs(value) <= MAX_OPTION:  # Also NaN; no float() of a huge int.
      raise errors.ConfigError(f"--{flag}={value}: must be a finite number "
                               f"of magnitude at most {MAX_OPTION:g}")
    if self.maximum is not None and not value <= self.maximum:
      raise errors.ConfigError(f"--{flag}={value}: must be <= {self.maximum:g}")
    if self.minimum is None:
      return
    if self.strict and not value > self.minimum:
      raise errors.ConfigError(
          f"--{flag}={value}: must be "
          + ("positive" if self.minimum == 0 else f"> {self.minimum}"))
    if not self.strict and not value >= self.minimum:
      raise errors.ConfigError(f"--{flag}={value}: must be >= {self.minimum:g}")


@dataclasses.dataclass(frozen=True)
class Method:
  """One method's catalogue entry.

  Attributes:
    name: The flag value that picks it, and its module's name.
    summary: A few words for the flag's help.
    options: Its hyperparameters.
    has_gram_form: An aggregator whose update needs only the Gram matrix
      of the task gradients (usable with --rep_grad).
    sub_batches: An aggregator's K independent sub-batch gradients per task
      (1: the full-batch Jacobian).
    needs_losses: Whether it gets the step's [T] global-batch task losses.
  """

  name: str
  summary: str
  options: tuple[Option, ...] = ()
  has_gram_form: bool = False
  sub_batches: int = 1
  needs_losses: bool = False


class Catalogue:
  """The methods of one kind (`aggregator` or `weighting`), by name."""

  def __init__(self, kind: str, first: Sequence[str],
               methods: Sequence[Method]):
    """Lists `methods`.

    Args:
      kind: The flag that picks a method, without dashes.
      first: The names listed first, in this order (the flag's default,
        then the methods it has offered longest); the rest follow
        alphabetically.
      methods: Every method of this kind.
    """
    self.kind = kind
    self.default = first[0]
    self._first = tuple(first)
    self._methods: dict[str, Method] = {}
    for method in methods:
      self.add(method)

  def add(self, method: Method) -> None:
    """Lists `method` (one defined outside this package: a test's, a user's).

    Raises:
      ValueError: For a name listed already.
    """
    if method.name in self._methods:
      raise ValueError(f"{self.kind} {method.name!r} is listed twice")
    self._methods[method.name] = method

  def names(self) -> tuple[str, ...]:
    """Every name: `first`, then the others alphabetically."""
    first = [name for name in self._first if name in self._methods]
    return (*first, *sorted(set(self._methods) - set(first)))

  def get(self, name: str) -> Method:
    """The entry of method `name`.

    Raises:
      ConfigError: For an unknown name, listing the known ones.
    """
    if name not in self._methods:
      raise errors.ConfigError(f"unknown {self.kind} {name!r} (known: "
                               f"{', '.join(self.names())})")
    return self._methods[name]

  def describe(self) -> str:
    """'name (summary), ...' of every method, for a flag's help."""
    return ", ".join(f"{name} ({self._methods[name].summary})"
                     for name in self.names())

  def options(self) -> Iterator[tuple[str, str, Option]]:
    """(flag, method, option) for every option of every method, by flag."""
    found = [(f"{name}_{option.name}", name, option)
             for name, method in self._methods.items()
             for option in method.options]
    return iter(sorted(found))


_DUAL_CONE_REG_EPS = Option(
    "reg_eps", DUAL_CONE_REG_EPS, "added to the diagonal of the "
    "trace-normalised Gram matrix, so that it is positive definite",
    minimum=0.0, strict=True)
_BARGAINING_REG_EPS = Option(
    "reg_eps", BARGAINING_REG_EPS, "added to the diagonal of the gradients' "
    "cosine matrix, so that a solution exists", minimum=0.0, strict=True)

AGGREGATORS = Catalogue(AGGREGATOR, ("sum", "pcgrad", "cagrad", "mgda"), (
    Method("sum", "the plain sum"),
    Method("pcgrad", "project out conflicts, Yu et al. 2020"),
    Method("cagrad", "conflict-averse, Liu et al. 2021", has_gram_form=True,
           options=(Option(
               "c", 0.5, "c (the update stays within c |g0| / (1 + c^2) of "
               "g0 / (1 + c^2))", minimum=0.0),)),
    Method("mgda", "min-norm point, Sener & Koltun 2018", has_gram_form=True),
    Method("aligned_mtl", "aligned gradient components, Senushkin et al. "
           "2023", has_gram_form=True),
    Method("conflict_free", "ConFIG, equal cosine with every task, Liu et "
           "al. 2024", has_gram_form=True),
    Method("db_mtl", "log losses, gradients to equal norms, Lin et al. 2023",
           needs_losses=True, options=(
               Option("beta", 0.9, "weight of the old gradient average",
                      minimum=0.0),
               Option("beta_sigma", 0.0, "decay exponent: the weight is "
                      "beta / k^beta_sigma", minimum=0.0))),
    Method("dualproj", "the mean projected onto the dual cone, TorchJD",
           has_gram_form=True, options=(_DUAL_CONE_REG_EPS,)),
    Method("fairgrad", "alpha-fair resource allocation, Ban & Ji 2024",
           has_gram_form=True, options=(
               Option("alpha", 1.0, "the fairness exponent: 1 proportional "
                      "fairness, larger values favour the worst-off task",
                      minimum=0.0, strict=True),
               _BARGAINING_REG_EPS)),
    Method("graddrop", "gradient sign dropout, Chen et al. 2020", options=(
        Option("leak", 0.0, "the rate (in [0, 1]) at which a task's dropped "
               "gradient components still pass", minimum=0.0, maximum=1.0),)),
    Method("gradvac", "raise pairwise cosines to their running mean, Wang et "
           "al. 2021", options=(
               Option("beta", 0.01, "weight of the new cosine in each pair's "
                      "target (moving average; LibMTL's default is 0.5)",
                      minimum=0.0, maximum=1.0),)),
    Method("imtl_g", "equal projections on every task, Liu et al. 2021",
           has_gram_form=True),
    Method("moco", "tracked gradients, softmax weights, Fernando et al. 2023",
           needs_losses=True, options=(
               Option("beta", 0.5, "step size of the tracked gradients y",
                      minimum=0.0),
               Option("beta_sigma", 0.5, "decay exponent: y's step is "
                      "beta / k^beta_sigma", minimum=0.0),
               Option("gamma", 0.1, "step size of the task weights lambda",
                      minimum=0.0),
               Option("gamma_sigma", 0.5, "decay exponent: lambda's step is "
                      "gamma / k^gamma_sigma", minimum=0.0),
               Option("rho", 0.0, "L2 regularisation of lambda's step",
                      minimum=0.0))),
    Method("modo", "double-sampling MGDA, Chen et al. 2023", sub_batches=3,
           options=(
               Option("gamma", 1e-3, "step size of the task weights lambda",
                      minimum=0.0, strict=True),
               Option("rho", 0.1, "l2 regularisation of lambda's update",
                      minimum=0.0))),
    Method("nash_mtl", "Nash bargaining, Navon et al. 2022",
           has_gram_form=True, options=(
               Option("update_every", 1, "recompute the weights every this "
                      "many steps, reusing them in between", minimum=1),
               Option("max_norm", 1.0, "the update's norm is clipped to this "
                      "(0: no clipping)", minimum=0.0),
               _BARGAINING_REG_EPS)),
    Method("sdmgrad", "stochastic direction-oriented MGDA, Xiao et al. 2023",
           sub_batches=3, options=(
               Option("lamda", 0.3, "weight of the mean gradient's direction "
                      "(the paper's lambda)", minimum=0.0),
               Option("niter", 20, "projected SGD steps of the weights per "
                      "step", minimum=1),
               Option("lr", SDMGRAD_LEARNING_RATE, "learning rate of those "
                      "steps (LibMTL's 5; below ~1/T they converge, see the "
                      "module docstring)", minimum=0.0, strict=True))),
    Method("upgrad", "projections onto the dual cone, Quinton & Rey 2024",
           has_gram_form=True, options=(_DUAL_CONE_REG_EPS,)),
))

WEIGHTINGS = Catalogue(WEIGHTING, ("static", "uncertainty", "dwa",
                                   "gradnorm"), (
    Method("static", "--task_weights"),
    Method("uncertainty", "learned log-variances, Kendall et al. 2018"),
    Method("dwa", "dynamic weight average, Liu et al. 2019", options=(
        Option("window", 100, "steps per loss-averaging window (the paper's "
               "epoch)", minimum=0, strict=True),)),
    Method("gradnorm", "Chen et al. 2018", options=(
        Option("alpha", 1.5, "alpha (the pull towards equal training rates)",
               minimum=0.0),
        Option("lr", 0.025, "Adam step size of the weight update",
               minimum=0.0, strict=True))),
    Method("excess_mtl", "excess-risk weights, He et al. 2024", options=(
        Option("robust_step_size", 0.01, "step size eta of the exponentiated "
               "weight update", minimum=0.0),)),
    Method("famo", "fast adaptive multitask optimization, Liu et al. 2023",
           needs_losses=True, options=(
               Option("lr", 0.025, "Adam step size of the task logits",
                      minimum=0.0, strict=True),
               Option("gamma", 1e-3, "weight decay (L2) of the task logits",
                      minimum=0.0))),
    Method("gls", "geometric mean of the losses, Chennupati et al. 2019",
           needs_losses=True),
    Method("imtl_l", "learned loss scales, IMTL-L of Liu et al. 2021"),
    Method("rlw", "random weights each step, Lin et al. 2022"),
    Method("stch", "smooth Tchebycheff scalarisation, Lin et al. 2024",
           needs_losses=True, options=(
               Option("mu", 1.0, "smoothing parameter mu", minimum=0.0,
                      strict=True),
               Option("warmup_steps", 100, "applied steps of the log-loss "
                      "warm-up whose mean losses are the nadir vector (the "
                      "paper's warm-up epochs)", minimum=0, strict=True))),
))

BY_KIND = {AGGREGATOR: AGGREGATORS, WEIGHTING: WEIGHTINGS}


def option_flags() -> list[tuple[str, str, str, Option]]:
  """(flag, kind, method, option) of every method option, weightings first."""
  return [(flag, methods.kind, method, option)
          for methods in (WEIGHTINGS, AGGREGATORS)
          for flag, method, option in methods.options()]


def gram_forms() -> list[str]:
  """The aggregators with a Gram-matrix form (usable with --rep_grad)."""
  return [name for name in AGGREGATORS.names()
          if AGGREGATORS.get(name).has_gram_form]
