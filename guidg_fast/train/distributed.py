"""torch.distributed glue for the trainer: process group, rank helpers, sharding, a dead-rank watchdog.

One process per device (``torchrun --nproc_per_node N -m guidg_fast ...``, or an initialised group
from the caller). The trainer stays a single-process program with a few hooks; everything that
depends on the world size lives here:

- ``setup``: uses an initialised default group, or creates one from torchrun's environment
  (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT): NCCL for CUDA, gloo for the CPU.
  Without either it returns a one-process context whose collectives are no-ops.
- sharding: a step's global batch is cut into contiguous row ranges (``row_bounds``), so the ranks
  together see exactly the rows one process would; evaluation hands whole batches round-robin to
  ranks (``batch_starts``) so every batch -- and hence every batch-mean expert weight -- is the one
  a single process computes, and every image is counted once whatever the world size.
- ``assemble_rows``: every rank gets the full (B, ...) tensor from the rows each rank holds, by a
  sum all-reduce of zero-padded tensors. Each element is one rank's value plus exact zeros, so the
  result is bitwise the concatenation (also for uneven slices, with one collective of fixed shape).
- ``Watchdog``: a heartbeat per rank in the group's store; when a collective fails or times out,
  ``guard`` turns the backend's error into ``DistributedError`` naming the rank that stopped
  beating. If the caller's group has a longer collective timeout than ours, the watchdog ends the
  process itself (exit status 3) once a peer has been silent for ``timeout_s`` plus a grace period,
  so no rank hangs on a dead peer.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

TIMEOUT_ENV = "GUIDG_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_HEARTBEAT_PREFIX = "guidg_fast/heartbeat/"
WATCHDOG_EXIT_STATUS = 3


class DistributedError(RuntimeError):
    """A collective failed: a rank died, hung past the timeout, or the group is unusable."""


def _dist():
    import torch.distributed as dist

    return dist


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank before (or without) a process group: 0 outside torchrun."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return env_rank() == 0


def row_bounds(total: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges of a global batch, one per rank, sizes differing by <= 1."""
    if total < 0 or world_size < 1:
        raise ValueError(f"row_bounds needs total >= 0 and world_size >= 1, got {total}, {world_size}")
    base, extra = divmod(total, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def batch_starts(n: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Start offsets of the fixed-size batches of an n-item dataset that ``rank`` evaluates."""
    return list(range(rank * batch_size, n, world_size * batch_size))


class Watchdog:
    """Heartbeats in the group's key-value store, read back to name ranks that stopped."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float, interval_s: float | None = None,
                 exit_on_silence: bool = True):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s = timeout_s
        self.interval_s = interval_s if interval_s is not None else min(5.0, max(0.2, timeout_s / 10))
        self.exit_on_silence = exit_on_silence
        self._stop = threading.Event()
        self._last_change = {r: time.monotonic() for r in range(world_size)}
        self._last_value: dict[int, int] = {}
        self.silent: dict[int, float] = {}  # rank -> seconds without a heartbeat
        self.store_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"guidg_fast-watchdog-{rank}", daemon=True)

    def start(self) -> "Watchdog":
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        self.store.add(_HEARTBEAT_PREFIX + str(self.rank), 1)

    def read(self) -> dict[int, int]:
        return {r: int(self.store.add(_HEARTBEAT_PREFIX + str(r), 0)) for r in range(self.world_size)}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                values = self.read()
            except Exception as exc:  # the store's host (rank 0 or torchrun's agent) is gone
                self.store_error = f"{exc.__class__.__name__}: {exc}"
                values = None
            now = time.monotonic()
            if values is not None:
                for r, v in values.items():
                    if self._last_value.get(r) != v:
                        self._last_value[r], self._last_change[r] = v, now
                self.silent = {r: now - t for r, t in self._last_change.items()
                               if r != self.rank and now - t > self.timeout_s}
            stalled = bool(self.silent) or (self.store_error is not None and now - max(self._last_change.values()) > self.timeout_s)
            if stalled and self.exit_on_silence and now - min(self._last_change.values()) > self.timeout_s + max(
                    5.0, 3 * self.interval_s):
                # the main thread is still blocked in a collective that will not return (a group
                # created by the caller with a longer timeout): end the process with the reason
                sys.stderr.write(f"[guidg_fast] rank {self.rank}: {self.describe()}; exiting (status "
                                 f"{WATCHDOG_EXIT_STATUS}) instead of waiting on the dead rank\n")
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_STATUS)

    def dead_ranks(self, settle_s: float | None = None) -> tuple[list[int], str | None]:
        """Ranks whose heartbeat does not advance over ``settle_s`` (a few intervals), and a store error."""
        settle_s = settle_s if settle_s is not None else 3 * self.interval_s + 0.2
        try:
            before = self.read()
            time.sleep(settle_s)
            after = self.read()
        except Exception as exc:
            return sorted(self.silent), f"{exc.__class__.__name__}: {exc}"
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]], None

    def describe(self) -> str:
        if self.silent:
            return ", ".join(f"rank {r} sent no heartbeat for {s:.1f} s" for r, s in sorted(self.silent.items()))
        if self.store_error:
            return f"the rendezvous store is unreachable ({self.store_error}); rank 0 or the launcher died"
        return "no rank stopped beating"


@dataclass
class DistContext:
    """This process's place in the group. ``world_size == 1``: every collective is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False
    watchdog: Watchdog | None = None
    _where: list = field(default_factory=list)  # the open guards, outermost first

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend}

    # -- collectives (all ranks must call them in the same order) ----------------------------------
    @contextlib.contextmanager
    def guard(self, what: str):
        """Turns a failed or timed-out collective inside the block into a DistributedError that says
        which rank stopped (from the heartbeats) and where."""
        if not self.enabled:
            yield
            return
        self._where.append(what)
        try:
            yield
        except DistributedError:
            raise
        except Exception as exc:
            if not _looks_distributed(exc):
                raise
            message = self._failure_message(" / ".join(self._where), exc)
            if self.watchdog is not None:  # the group is unusable now: no exit on top of the error
                self.watchdog.stop()
            raise DistributedError(message) from exc
        finally:
            self._where.pop()

    def _failure_message(self, what: str, exc: BaseException) -> str:
        head = f"rank {self.rank} of {self.world_size}: {what} failed"
        if self.watchdog is None:
            return (f"{head} (a peer rank died or did not reach the collective within the {self.timeout_s:.0f} s "
                    f"timeout; no heartbeat store to name it): {exc}")
        dead, store_error = self.watchdog.dead_ranks()
        if dead:
            who = ", ".join(f"rank {r}" for r in dead)
            return f"{head}: {who} stopped (no heartbeat; died or killed), timeout {self.timeout_s:.0f} s: {exc}"
        if store_error:
            return (f"{head}: the rendezvous store is unreachable ({store_error}): rank 0 or the launcher died; "
                    f"timeout {self.timeout_s:.0f} s: {exc}")
        return (f"{head}: every rank still beats, so a rank is stuck or took another path past the "
                f"{self.timeout_s:.0f} s timeout: {exc}")

    def barrier(self, what: str = "barrier") -> None:
        if self.enabled:
            with self.guard(what):
                # a barrier as a tiny all-reduce: gloo's barrier ignores the group's timeout on some versions
                self.all_reduce_sum_(torch.zeros(1, device=self.device), what)

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        if self.enabled:
            with self.guard(what):
                _dist().all_reduce(tensor, op=_dist().ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensors, src: int = 0, what: str = "broadcast") -> None:
        if self.enabled:
            with self.guard(what):
                for t in tensors:
                    _dist().broadcast(t, src=src)

    def broadcast_module_(self, module: torch.nn.Module, src: int = 0, what: str = "broadcast of weights") -> None:
        """Every parameter and buffer of ``module`` from rank ``src`` (in place, no autograd)."""
        if self.enabled:
            with torch.no_grad():
                self.broadcast_(list(module.state_dict().values()), src, what)

    def assemble_rows(self, local: torch.Tensor, start: int, total: int, what: str = "gather of a batch") -> torch.Tensor:
        """The (total, ...) tensor whose rows [start, start + len(local)) are ``local`` on each rank.

        No gradient flows through the other ranks' rows; ``local`` keeps its own (the returned tensor
        is differentiable w.r.t. ``local`` only)."""
        if not self.enabled:
            if start != 0 or local.shape[0] != total:
                raise ValueError(f"assemble_rows: one process holds rows [0, {total}), got [{start}, {start + local.shape[0]})")
            return local
        full = torch.zeros((total, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[start : start + local.shape[0]] = local.detach()
        self.all_reduce_sum_(full, what)
        stop = start + local.shape[0]
        return torch.cat([full[:start], local, full[stop:]])

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.owns_group and _dist().is_initialized():
            _dist().destroy_process_group()
        self.owns_group = False


def _looks_distributed(exc: BaseException) -> bool:
    dist = _dist()
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection", "peer", "socket", "store")
    )


_CONTEXT: DistContext | None = None


def current() -> DistContext:
    """The context ``setup`` made in this process (one-process when it was never called)."""
    return _CONTEXT if _CONTEXT is not None else DistContext()


def setup(device: str | torch.device = "cpu", timeout_s: float | None = None, watchdog: bool = True) -> DistContext:
    """This process's DistContext: the initialised default group, one created from torchrun's
    environment, or a one-process context. ``device="cuda"`` becomes ``cuda:LOCAL_RANK`` in a group.

    Idempotent: a second call returns the first context (the group is created once per process).
    """
    global _CONTEXT
    dist = _dist()
    device = torch.device(device)
    timeout_s = float(timeout_s) if timeout_s is not None else timeout_from_env()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if _CONTEXT is not None and _CONTEXT.enabled and initialised:
        return _CONTEXT
    if not initialised and not launched_by_torchrun():
        _CONTEXT = DistContext(device=device, timeout_s=timeout_s)
        return _CONTEXT
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not initialised:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device='cuda' under torchrun, but no CUDA GPU is visible to this process")
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                                   f"--nproc_per_node must not exceed the GPUs per node")
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    backend = str(dist.get_backend())
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if owns else torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    dog = None
    if watchdog and world > 1:
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # a group without a store (e.g. some custom init): timeouts only, unnamed
            store = None
        if store is not None:
            dog = Watchdog(store, rank, world, timeout_s).start()
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend,
                           timeout_s=timeout_s, owns_group=owns, watchdog=dog)
    return _CONTEXT


class GlobalBatch:
    """Step 2 across ranks, at the normalised features: this rank holds rows [start, stop) of a
    global batch of ``total``.

    The guidance loss is a function of the whole batch (batch-mean CMAttn weights, a batch-mean
    loss), so per-rank losses averaged by DDP would be another function. Instead every rank gathers
    the whole batch's (f, y) (one exact all-reduce: f and the labels packed as one fp32 tensor,
    labels exact below 2^24 classes), computes the global loss, and sends back through its encoder
    its own rows of the loss gradient, times ``world_size``: DDP's gradient averaging then yields
    the sum of the ranks' shares, i.e. the one-process gradient. CMAttn's gradient comes from the
    whole batch on every rank already (the same on each); DDP's average of equal values keeps it.
    """

    def __init__(self, ctx: DistContext, start: int, stop: int, total: int):
        self.ctx, self.start, self.stop, self.total = ctx, int(start), int(stop), int(total)

    def gather(self, f_local: torch.Tensor, y_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if f_local.shape[0] != self.stop - self.start or y_local.shape[0] != f_local.shape[0]:
            raise ValueError(f"GlobalBatch: rank {self.ctx.rank} holds rows [{self.start}, {self.stop}) but got "
                             f"{f_local.shape[0]} features and {y_local.shape[0]} labels")
        dim = f_local.shape[1]
        packed = torch.cat([f_local.detach().float(), y_local.to(torch.float32).unsqueeze(1)], dim=1)
        full = self.ctx.assemble_rows(packed, self.start, self.total, "all-reduce of the step-2 image features")
        return full[:, :dim], full[:, dim].round().to(torch.long)

    def local_grad(self, grad_all: torch.Tensor) -> torch.Tensor:
        return grad_all[self.start : self.stop] * float(self.ctx.world_size)


def batch_record(ctx: DistContext, global_batch: int) -> dict:
    """What metrics.json and the log say about the split: world size and each rank's rows per step."""
    sizes = [hi - lo for lo, hi in row_bounds(global_batch, ctx.world_size)]
    return {"world_size": ctx.world_size, "backend": ctx.backend, "global_batch": global_batch,
            "per_rank_batch": sizes}


def shutdown() -> None:
    """Ends the watchdog and destroys the group if ``setup`` created it."""
    global _CONTEXT
    if _CONTEXT is not None:
        _CONTEXT.close()
    _CONTEXT = None
