"""Where an export may go: never over the run it comes from, never over data.

An export replaces its directory, so the directory must hold nothing but an
earlier export.
"""

from __future__ import annotations

import os
import tempfile

from mtl_dist import errors


def check_export_dir(export_dir: str) -> None:
  """Refuses an export directory that holds something else than an export.

  An existing SavedModel is replaced; any other non-empty directory is kept
  from being overwritten.

  Raises:
    ConfigError: For a file, or a non-empty directory without a SavedModel.
  """
  # TensorFlow's file system reaches remote paths (gs://, ...); imported
  # here, so that the configuration (which imports this) needs none.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(export_dir):
    check_writable(export_dir, "--export_dir")
    return
  if not tf.io.gfile.isdir(export_dir):
    raise errors.ConfigError(f"--export_dir={export_dir}: is a file")
  contents = tf.io.gfile.listdir(export_dir)
  if contents and "saved_model.pb" not in contents:
    raise errors.ConfigError(
        f"--export_dir={export_dir}: a non-empty directory "
        "that holds no SavedModel; give a new or empty one")


def check_writable(path: str, flag: str) -> None:
  """Refuses a local directory to be that cannot be made: checked by making
  (and deleting) a file in its nearest existing parent.

  Remote paths (gs://, ...) are left to the write itself.

  Raises:
    ConfigError: If a parent is a file, or the parent cannot be written.
  """
  if "://" in path:
    return
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise errors.ConfigError(f"{flag}={path}: {parent} is a file, not a "
                             "directory")
  try:
    fd, probe = tempfile.mkstemp(dir=parent, prefix=".mtl_dist-probe-")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise errors.ConfigError(
        f"{flag}={path}: cannot be written ({type(e).__name__}: "
        f"{e.strerror or e} in {parent})") from None


def validate(export: str, model_dir: str) -> None:
  """Refuses an export directory whose replacement would hit the run.

  Raises:
    ConfigError: For a directory holding the run, or inside its
      checkpoints, or holding something else than an export.
  """
  export_path = os.path.abspath(export)
  model = os.path.abspath(model_dir)
  inside = lambda path, parent: (path + os.sep).startswith(parent + os.sep)
  if inside(model, export_path) or inside(
      export_path, os.path.join(model, "checkpoints")):
    raise errors.ConfigError(
        f"--export_dir={export}: an export replaces "
        "its directory, which would delete the run's files "
        f"in --model_dir={model_dir}; give another one")
  check_export_dir(export)
