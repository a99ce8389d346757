"""This host's GPUs, found without TensorFlow.

`mtl-local-cluster` splits them between its workers before any of them
starts TensorFlow; the SLURM resolver splits them between a node's tasks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from absl import logging


def visible_gpu_ids() -> list[str]:
  """This host's GPU ids: CUDA_VISIBLE_DEVICES, else nvidia-smi, else none.

  Entries that name no GPU (SLURM's `NoDevFiles`, `-1`) are dropped.
  """
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return [gpu.strip() for gpu in visible.split(",")
            if re.fullmatch(r"\d+|(GPU|MIG)-[\w/-]+", gpu.strip())]
  if shutil.which("nvidia-smi") is None:
    return []
  try:
    output = subprocess.run(["nvidia-smi", "--list-gpus"], check=True,
                            capture_output=True, text=True,
                            timeout=60).stdout
  except (subprocess.SubprocessError, OSError) as e:
    logging.warning("nvidia-smi failed (%s); using no GPUs.", e)
    return []
  count = sum(line.startswith("GPU ") for line in output.splitlines())
  return [str(i) for i in range(count)]
