"""Atomic checkpoint files: safetensors for tensors, JSON for configuration and metrics."""
from __future__ import annotations

import io
import json
import os
import tempfile

import torch


def _atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save

    # clone: safetensors refuses entries that share storage (e.g. an encoder saved under two names)
    flat = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic_write_bytes(path, save(flat, metadata=meta))


def load_tensors(path: str, device="cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    return load_file(path, device=str(device))


def save_json(path: str, data: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    with open(path) as fh:
        return json.load(fh)


def save_state(path: str, state: dict) -> None:
    """Training state with optimizer/scheduler/RNG objects (torch.save format, written atomically)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume state {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)
