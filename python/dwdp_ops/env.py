"""Where this process sits in the job: rank, world size and local rank from the launcher's environment.

Pure host logic (no CUDA): parsed from a mapping so that it is testable anywhere.

Recognised launchers, in order:
  * ``torchrun`` and ``python -m dwdp_ops.launch``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``;
  * ``mpirun`` (Open MPI): ``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_LOCAL_RANK``,
    ``OMPI_COMM_WORLD_LOCAL_SIZE``;
  * none of them: a single process, rank 0 of 1.
The rendezvous address is ``MASTER_ADDR`` (default 127.0.0.1) and ``MASTER_PORT`` (default 29531).
``DWDP_TIMEOUT`` (seconds a collective waits, default 300, at most ``MAX_TIMEOUT``) is parsed by
``timeout_from_environ`` for ``init()`` and ``dispatch_nccl.init_process_group_from_env`` alike.

Under ``torchrun`` (recognised by the ``TORCHELASTIC_*`` variables its agent sets, ``under_torchrun``),
``MASTER_ADDR:MASTER_PORT`` is where torchrun's own TCPStore listens; ``rendezvous.Rendezvous`` then asks that store
for the port of our control plane instead of listening there itself.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from ._checks import is_bool, is_int

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29531
DEFAULT_TIMEOUT = 300.0
# The longest wait accepted (about 31 years): socket and lock timeouts overflow a bit above 9.2e9 s ("timestamp out of
# range for platform time_t" deep inside a rendezvous), so anything longer is refused where it is parsed.
MAX_TIMEOUT = 1e9
TIMEOUT_VAR = "DWDP_TIMEOUT"

_TORCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
_TORCHELASTIC = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "GROUP_RANK")
_OMPI = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by torchrun's elastic agent (it sets ``TORCHELASTIC_RUN_ID``,
    ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_USE_AGENT_STORE`` and ``GROUP_RANK`` for every worker) and not by
    ``dwdp_ops.launch`` (``DWDP_LAUNCHER``), whose ``MASTER_PORT`` is free for us."""
    env = os.environ if environ is None else environ
    if env.get("DWDP_LAUNCHER"):
        return False
    return "RANK" in env and any(env.get(k, "").strip() for k in _TORCHELASTIC)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def timeout_from_environ(timeout: float | None = None, environ: Mapping[str, str] | None = None,
                         default: float = DEFAULT_TIMEOUT) -> float:
    """Seconds a collective waits: ``timeout`` when given, else ``DWDP_TIMEOUT`` (unset or blank: ``default``).
    Invariant: the result is a finite number > 0 and <= ``MAX_TIMEOUT`` (1e9 s). Otherwise ValueError names where the
    value came from: the ``timeout`` argument, or ``DWDP_TIMEOUT=<value>`` with what is expected."""
    if timeout is not None:
        if is_bool(timeout):  # float(True) would be 1 second
            raise ValueError(f"timeout must be > 0 seconds (a number, not a bool), got {timeout!r}")
        try:
            t = float(timeout)
        except OverflowError:  # (an int beyond floats' range: float() raised a bare OverflowError)
            t = 2 * MAX_TIMEOUT if timeout > 0 else -1.0  # too long / not > 0, as a float of it would be
        except (TypeError, ValueError):
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}") from None
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"timeout must be > 0 seconds and finite, got {timeout!r}")
        if t > MAX_TIMEOUT:
            raise ValueError(f"timeout must be at most {MAX_TIMEOUT:g} seconds (about 31 years), got {timeout!r}")
        return t
    env = os.environ if environ is None else environ
    raw = env.get(TIMEOUT_VAR)
    if raw is None or raw.strip() == "":
        return float(default)
    try:
        t = float(raw.strip())
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"environment variable {TIMEOUT_VAR}={raw!r}: expected a finite number of seconds > 0 "
                         f"(unset it for the default {default:g})")
    if t > MAX_TIMEOUT:
        raise ValueError(f"environment variable {TIMEOUT_VAR}={raw!r}: expected at most {MAX_TIMEOUT:g} seconds "
                         f"(about 31 years; unset it for the default {default:g})")
    return t


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. Invariants: ``0 <= rank < world_size`` and
    ``0 <= local_rank < local_world_size <= world_size``. The five numbers are integers (Python or numpy, made
    ints; bools, floats and strings raise TypeError naming the field)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "single"

    def __post_init__(self) -> None:
        for name in ("rank", "world_size", "local_rank", "local_world_size", "master_port"):
            v = getattr(self, name)
            if not is_int(v):
                raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
            object.__setattr__(self, name, int(v))
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size}) (world size {self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(f"local world size {self.local_world_size} must be in [1, {self.world_size}]")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local rank {self.local_rank} is outside [0, {self.local_world_size})")
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"MASTER_PORT={self.master_port} is not a TCP port (1-65535)")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        addr = env.get("MASTER_ADDR", "").strip() or DEFAULT_MASTER_ADDR
        port = _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT)
        torch = cls._read(env, _TORCH)
        ompi = cls._read(env, _OMPI)
        if torch and ompi and torch != ompi:  # (all four: a disagreeing local rank picked another GPU silently)
            raise ValueError(
                "launcher environments disagree: "
                + " ".join(f"{n}={v}" for n, v in zip(_TORCH, torch)) + " but "
                + " ".join(f"{n}={v}" for n, v in zip(_OMPI, ompi)) + "; unset one of them"
            )
        found = torch or ompi
        if found is None:
            return cls(master_addr=addr, master_port=port)
        launcher = env.get("DWDP_LAUNCHER", "torchrun") if torch else "mpirun"
        rank, world, local_rank, local_world = found
        return cls(rank, world, local_rank, local_world, addr, port, launcher)

    @staticmethod
    def _read(env: Mapping[str, str], names: tuple[str, str, str, str]) -> tuple[int, int, int, int] | None:
        rank_n, world_n, local_n, local_world_n = names
        rank, world = _int(env, rank_n), _int(env, world_n)
        if rank is None and world is None:
            return None
        if rank is None or world is None:
            missing = rank_n if rank is None else world_n
            present = world_n if rank is None else rank_n
            raise ValueError(f"{present} is set but {missing} is not: a launcher sets both")
        local_rank = _int(env, local_n, None)
        local_world = _int(env, local_world_n, None)
        if local_rank is None:
            if local_world is not None and local_world < world:
                raise ValueError(f"{local_world_n}={local_world} (fewer than {world_n}={world}: more than one node) "
                                 f"is set but {local_n} is not: the global rank cannot pick this node's GPU")
            # Single-node default: the global rank picks the GPU.
            local_rank = rank
        if local_world is None:
            local_world = world
        return rank, world, local_rank, local_world
