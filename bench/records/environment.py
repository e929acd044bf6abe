"""Where and with what a result was produced: git state, package versions, devices, SLURM ids."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "deepspeed", "diffusers", "peft", "timm", "clean-fid", "numpy", "scipy", "safetensors")
_REPO = Path(__file__).resolve().parents[2]  # bench/records/environment.py -> the repository


def git_state() -> dict[str, Any]:
    """sha and dirty flag of the checkout the code runs from (``None`` outside a git checkout)."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(world_size: int = 1) -> dict[str, Any]:
    """Host, devices, versions and SLURM ids, for the run record."""
    cuda = torch.cuda.is_available()
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "world_size": world_size,
        "packages": package_versions(),
        "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
                                             "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT") if k in os.environ},
        **git_state(),
    }


def device_environment(world_size: int, device: str) -> dict[str, Any]:
    """The numeric stack (versions as the imported modules report them), the device and host of a computation,
    for the evaluation record's ``env``; the metrics add what they guarantee on top (TF32 off, no autocast)."""
    import numpy
    import scipy
    import timm

    return {
        "torch": torch.__version__, "timm": timm.__version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None, "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "python": platform.python_version(), "host": socket.gethostname(),
        "world_size": world_size,
    }
