"""Atomic checkpoint files and folders: safetensors for tensors, JSON for configuration and metrics.

Nothing here unpickles: a training state (optimizer, scheduler, RNG, history) is one safetensors
file whose tensors are the state's tensors and whose metadata is the rest of the state as JSON, so
loading a state file, crafted or not, can only produce tensors, numbers, strings and containers.

Every file is written to a temporary name and renamed into place; a model folder is written as a
temporary folder and swapped in whole, and its config records the SHA-256 of its weights file,
checked on load. Temporary files and folders carry the writer's pid, so the leftovers of a killed
writer are removed by the next write into the same folder.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile

import torch

STATE_FORMAT = "guidg-fast-state/1"
_STATE_KEY = "guidg_fast_state"
_TMP_PREFIX = ".tmp-"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss (or state); the message names the steps and likely causes."""


# ------------------------------------------------------------------ temporary files
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Removes ``.tmp-<pid>-*`` files and folders in ``folder`` whose writer process is gone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_TMP_PREFIX):
            continue
        pid_text = entry.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue  # a live writer's file, or not one of ours
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            pass
    return removed


def _tmp_prefix() -> str:
    return f"{_TMP_PREFIX}{os.getpid()}-"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(), suffix=os.path.basename(path))
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
    _fsync_dir(folder)


# ------------------------------------------------------------------ tensors and JSON
def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    from safetensors.torch import save

    # clone: safetensors refuses entries that share storage (e.g. an encoder saved under two names)
    flat = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return save(flat, metadata=metadata)


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    _atomic_write_bytes(path, _safetensors_bytes(tensors, meta))


def _read_safetensors(path: str, what: str, data: bytes | None = None, device="cpu"):
    """(tensors, metadata) of a safetensors file; ValueError naming the file when it is not one."""
    from safetensors.torch import load

    if data is None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{what} {path!r} does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"{what} {path!r} is not a regular file (a folder?)")
        with open(path, "rb") as fh:
            data = fh.read()
    problem = _safetensors_header_problem(data)
    if problem is None:
        try:
            tensors = load(data)
        except Exception as exc:  # SafetensorError, struct errors: the message lacks the path
            problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise ValueError(f"{what} {path!r} is not a readable safetensors file ({problem}); truncated or overwritten?")
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def _safetensors_header_problem(data: bytes) -> str | None:
    if len(data) < 8:
        return f"{len(data)} bytes, shorter than a safetensors header" if data else "empty file"
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        return f"header of {header_len} bytes in a file of {len(data)}"
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        return f"header is not JSON: {exc}"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and "data_offsets" in v), default=0)
    if 8 + header_len + end > len(data):
        return f"tensor data ends at byte {8 + header_len + end} of a {len(data)}-byte file"
    return None


def load_tensors(path: str, device="cpu") -> dict[str, torch.Tensor]:
    return _read_safetensors(path, "checkpoint file", device=device)[0]


def save_json(path: str, data: dict) -> None:
    _atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def load_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path!r} is not valid JSON ({exc}); truncated or overwritten?") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------ training state
def _encode_state(obj, tensors: dict, where: str):
    """JSON skeleton of ``obj``; tensors go to ``tensors`` under generated keys."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/Inf: non-finite floats travel as strings
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"training state key {k!r} at {where} must be a str or int")
            items.append([k, _encode_state(v, tensors, f"{where}[{k!r}]")])
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        encoded = [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": encoded} if isinstance(obj, tuple) else encoded
    raise TypeError(f"training state entry at {where} has type {type(obj).__name__}, which a state file cannot hold")


def _decode_state(obj, tensors: dict, path: str):
    if isinstance(obj, list):
        return [_decode_state(v, tensors, path) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        if obj["__tensor__"] not in tensors:
            raise ValueError(f"resume state {path!r} refers to a tensor {obj['__tensor__']!r} it does not hold")
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    if set(obj) == {"__tuple__"}:
        return tuple(_decode_state(v, tensors, path) for v in obj["__tuple__"])
    if set(obj) == {"__dict__"}:
        return {k: _decode_state(v, tensors, path) for k, v in obj["__dict__"]}
    raise ValueError(f"resume state {path!r} has an entry of unknown form {sorted(obj)[:3]}")


def non_finite_entries(state, where: str = "state", limit: int = 3) -> list[str]:
    """Names of floating-point tensors in a nested state that hold NaN or Inf (at most ``limit``).

    One host sync per device for the whole state (a step-2 state has hundreds of CUDA tensors).
    """
    named: list[tuple[str, torch.Tensor]] = []

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel():
                named.append((name, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}[{k!r}]")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(state, where)
    by_device: dict = {}
    for name, t in named:
        by_device.setdefault(t.device, []).append((name, t))
    found: list[str] = []
    for entries in by_device.values():
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in entries])
        if bool(flags.all()):
            continue
        found.extend(name for (name, _), ok in zip(entries, flags.tolist()) if not ok)
    return found[:limit]


def save_state(path: str, state: dict) -> None:
    """A training state (nested dicts/lists of tensors, numbers and strings) as one safetensors file.

    Refuses a state holding NaN or Inf tensors (NonFiniteLossError): the last good state stays.
    """
    bad = non_finite_entries(state)
    if bad:
        raise NonFiniteLossError(
            f"training state for {path!r} holds NaN or Inf values in {', '.join(bad)}; not written "
            f"(the previous state file, if any, is kept)"
        )
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode_state(state, tensors, "state")
    meta = {"format": STATE_FORMAT, _STATE_KEY: json.dumps(skeleton)}
    _atomic_write_bytes(path, _safetensors_bytes(tensors, meta))


def load_state(path: str) -> dict:
    """A state written by ``save_state``; ValueError naming the file for anything else."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise ValueError(
                f"resume state {path!r} is a torch.save (pickle) file, not a guidg-fast state: pickles can run code, "
                "so it is not loaded. guidg-fast writes resume states as safetensors (step1_state.safetensors, "
                "step2_state.safetensors); restart the run, or resume from a state this version wrote"
            )
    tensors, metadata = _read_safetensors(path, "resume state")
    if metadata.get("format") != STATE_FORMAT or _STATE_KEY not in metadata:
        raise ValueError(
            f"resume state {path!r} is a safetensors file but not a guidg-fast training state (format "
            f"{metadata.get('format')!r}); pass the step1_state/step2_state file a run wrote"
        )
    try:
        skeleton = json.loads(metadata[_STATE_KEY])
    except ValueError as exc:
        raise ValueError(f"resume state {path!r} has a damaged state record ({exc})") from exc
    state = _decode_state(skeleton, tensors, path)
    if not isinstance(state, dict):
        raise ValueError(f"resume state {path!r} does not hold a state dict")
    return state


def check_resume_state(state: dict, path: str, stage: str, steps: int, required: tuple[str, ...]) -> int:
    """The step to continue from; ValueError naming the file when the state does not fit this run."""
    if state.get("stage") != stage:
        raise ValueError(f"resume={path!r} is not a {stage.replace('step', 'step-')} state (stage {state.get('stage')!r})")
    missing = [k for k in ("step",) + tuple(required) if k not in state]
    if missing:
        raise ValueError(f"resume state {path!r} lacks the entries {missing}: not a complete {stage} state")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"resume state {path!r} has an invalid step {step!r}")
    total = state.get("total_steps")
    if total is not None and total != steps:
        raise ValueError(
            f"resume state {path!r} was written by a run of {total} steps, this run has {steps}: the learning-rate "
            f"schedule (and BMA) depend on the total, so resume with the same iterations/epochs"
        )
    if step > steps:
        raise ValueError(f"resume state {path!r} is at step {step}, past this run's {steps} steps")
    return step


# ------------------------------------------------------------------ non-finite loss guard
class LossGuard:
    """Detects a NaN/Inf loss without a host sync per step.

    ``observe`` keeps each step's loss on its device; ``drain`` reads the losses observed since the
    last drain to the host in one transfer (the trainer's loops drain at logging and checkpoint
    steps and at the end); ``check`` judges the values read since the last check (and any still
    pending, in the same one transfer) and raises NonFiniteLossError naming the first non-finite
    step. The trainer checks at logging and checkpoint steps and at the end, and writes a
    checkpoint only after a passing check.
    """

    def __init__(self, stage: str, causes: str, every: int = 50):
        self.stage = stage
        self.causes = causes
        self.every = max(1, int(every))
        self.checkpoint: str | None = None  # the last state file written from a checked state
        self._first: int | None = None  # the first step observed since the last check
        self._pending: list = []  # the per-step losses not yet read to the host
        self._unchecked: list[float] = []  # read, not yet checked

    def observe(self, step: int, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach().float())
        if self._first is None:
            self._first = step

    def drain(self) -> list[float]:
        """The losses observed since the last drain, read to the host in one transfer (one sync)."""
        if not self._pending:
            return []
        values = torch.stack(self._pending).tolist()
        self._pending = []
        self._unchecked.extend(values)
        return values

    def due(self, step: int) -> bool:
        return (step + 1) % self.every == 0

    def check(self, step: int) -> None:
        """Raises if a loss observed since the last check (steps ``_first`` .. ``step``, 0-based) was not finite."""
        if self._first is None:
            return
        values = self._unchecked + (torch.stack(self._pending).tolist() if self._pending else [])
        first = self._first
        self._unchecked, self._first = [], None
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is None:
            return
        span = f"{first + 1}-{step + 1}" if first != step else f"{step + 1}"
        where = (f"step {first + bad + 1}" if first == step
                 else f"step {first + bad + 1} (first non-finite loss; checked {span})")
        kept = (f"the last good checkpoint is {self.checkpoint!r} (pass it as resume= / --resume)"
                if self.checkpoint else "no checkpoint was written in this run")
        raise NonFiniteLossError(
            f"{self.stage}: the loss became NaN or Inf at {where}. Likely causes: {self.causes}. "
            f"Training stopped; {kept}."
        )


# ------------------------------------------------------------------ model folders
def weights_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EINVAL)):
        return False
    raise OSError(err, os.strerror(err), a)


def write_model_folder(directory: str, files: dict[str, bytes]) -> None:
    """Writes ``files`` (name -> bytes) as the folder ``directory``, replacing it as one unit.

    The files go to a temporary sibling folder that is then swapped with the old folder (atomic
    exchange on Linux; elsewhere two renames, with a moment where ``directory`` is absent, never
    mixed). A reader sees the whole old folder or the whole new one.
    """
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(parent)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"cannot save a model folder to {directory!r}: it exists and is not a folder")
    if os.path.isdir(directory):
        # the old folder is replaced whole: never a folder that holds anything but a model's files
        others = sorted(n for n in os.listdir(directory) if n not in files and not n.startswith(_TMP_PREFIX))
        if others:
            raise ValueError(
                f"cannot save a model folder to {directory!r}: it holds other files ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); a model folder is replaced as a whole, so save into a new "
                "or empty folder, or one that a previous save wrote"
            )
    tmp = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(), suffix="-" + os.path.basename(directory))
    try:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        _fsync_dir(tmp)
        if not os.path.exists(directory):
            os.rename(tmp, directory)
        elif _rename_exchange(tmp, directory):
            shutil.rmtree(tmp)  # now the old folder
        else:
            old = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(), suffix="-old")
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
