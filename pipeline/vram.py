"""GPU memory: what the devices hold, what a model will need, and who may load what.

Three parts, all plain logic without sockets (the agent in pipeline/vram_agent.py puts them on the mesh):

* Devices. `NvmlGpus` reads every NVIDIA GPU through NVML (nvidia-ml-py): total, used and free
  memory, memory per process, temperature, utilisation. `SimulatedGPU` is a stand-in for tests and
  for trying the policy on a machine without a GPU: it is a simulation, named as such in every
  reading, and `allocate` / `free` per pid move its readings the way a model load moves NVML's.
  `detect_gpus` picks the simulation only when asked to, else NVML, else no GPU at all; no GPU is
  a normal outcome, not an error.
* Estimates. `estimate_safetensors` sums dtype x shape over the tensors a safetensors header
  lists (the header only: no weights are read, no torch needed); `estimate_sentence_transformer`
  adds what one forward pass of a batch needs on top of the weights. `EstimateBook` remembers,
  per model, how far the measured use (the NVML delta after loading) was from the estimate, and
  corrects the next estimate of that model by it.
* `LeasePolicy`. Who holds how many bytes of which GPU. Pure: the clock is injected and nothing
  runs by itself; the agent calls `expire()` on a timer. Its invariant is that no grant ever
  takes a GPU past its budget (total minus headroom, minus memory used outside any lease).
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

MIB = 1 << 20

# --- devices -----------------------------------------------------------------------------------


@dataclass
class GpuReading:
    """One GPU at one moment. Bytes throughout; temperature and utilisation are None where the
    device does not report them."""

    index: int
    name: str
    total: int
    used: int
    free: int
    temperature_c: float | None = None
    utilization_pct: float | None = None
    processes: dict[int, int] = field(default_factory=dict)   # pid -> bytes on this GPU


class GpuBackend(Protocol):
    kind: str            # "nvml" or "simulated"

    def readings(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NoGpu(Exception):
    """There is no GPU to manage here (no NVIDIA driver, no NVML library, no device); the message says which."""


class GpuReadError(Exception):
    """NVML answered at start but fails now (a GPU fell off the bus, the driver was reloaded)."""


class NvmlGpus:
    """Every NVIDIA GPU of this machine, read through NVML (the `pynvml` module of nvidia-ml-py)."""

    kind = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError:
            raise NoGpu("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
        self.nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise NoGpu("no NVIDIA driver library (libnvidia-ml.so not found)") from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise NoGpu("the NVIDIA driver is not loaded") from None
        except pynvml.NVMLError as exc:
            raise NoGpu(f"NVML did not start: {exc}") from None
        try:
            count = pynvml.nvmlDeviceGetCount()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.names = [_text(pynvml.nvmlDeviceGetName(h)) for h in self.handles]
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NoGpu(f"NVML cannot list the GPUs: {exc}") from None
        if not self.handles:
            pynvml.nvmlShutdown()
            raise NoGpu("the NVIDIA driver sees no GPU")

    def readings(self) -> list[GpuReading]:
        nv = self.nvml
        out = []
        for index, (handle, name) in enumerate(zip(self.handles, self.names)):
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
            except nv.NVMLError as exc:
                raise GpuReadError(f"GPU {index} ({name}): cannot read its memory: {exc}") from None
            out.append(GpuReading(index=index, name=name, total=int(mem.total), used=int(mem.used), free=int(mem.free),
                                  temperature_c=self._optional(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU),
                                  utilization_pct=self._optional(lambda h: nv.nvmlDeviceGetUtilizationRates(h).gpu, handle),
                                  processes=self._processes(handle)))
        return out

    def _optional(self, read: Callable[..., float], *args) -> float | None:
        try:
            return float(read(*args))
        except self.nvml.NVMLError:   # NotSupported on some boards, NoPermission in some containers
            return None

    def _processes(self, handle) -> dict[int, int]:
        nv = self.nvml
        procs: dict[int, int] = {}
        for fn in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in fn(handle):
                    used = getattr(p, "usedGpuMemory", None)
                    if used is not None:   # None: the driver does not say (Windows WDDM, some containers)
                        procs[int(p.pid)] = max(procs.get(int(p.pid), 0), int(used))
            except nv.NVMLError:
                continue
        return procs

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class SimulatedOutOfMemory(Exception):
    """A simulated allocation that would not fit on the simulated device (what CUDA would call OOM)."""


class SimulatedGPU:
    """A SIMULATION of one or more GPUs, for tests and for trying the policy without a GPU.

    Nothing here touches hardware. Memory is whatever `allocate(pid, bytes)` and `free(pid)` say,
    so a test "loads a model" by allocating for the holder's pid and the readings move as NVML's
    would. Temperature follows memory use (30 C empty, 80 C full) and utilisation is whatever
    `set_utilization` set; both are made up. Every device name starts with "SimulatedGPU", so no
    reading can be mistaken for a real card's. Thread-safe: a test may allocate while the agent reads.
    """

    kind = "simulated"

    def __init__(self, total_bytes: int | Sequence[int], name: str = "SimulatedGPU", *, reserved_bytes: int = 0):
        totals = [total_bytes] if isinstance(total_bytes, int) else list(total_bytes)
        if not totals or any(t <= 0 for t in totals):
            raise ValueError(f"a simulated GPU needs a positive size, got {total_bytes!r}")
        self.name = name if name.startswith("SimulatedGPU") else f"SimulatedGPU {name}"
        self.totals = totals
        self.reserved = reserved_bytes     # what the driver keeps for itself on an idle card
        self.procs: list[dict[int, int]] = [{} for _ in totals]
        self.utilization = [0.0 for _ in totals]
        self._lock = threading.Lock()

    def allocate(self, pid: int, nbytes: int, gpu: int = 0) -> None:
        with self._lock:
            used = self.reserved + sum(self.procs[gpu].values())
            if used + nbytes > self.totals[gpu]:
                raise SimulatedOutOfMemory(f"{self.name} {gpu}: {nbytes / MIB:.0f} MiB asked, "
                                           f"{(self.totals[gpu] - used) / MIB:.0f} MiB free")
            self.procs[gpu][pid] = self.procs[gpu].get(pid, 0) + nbytes

    def free(self, pid: int, nbytes: int | None = None, gpu: int = 0) -> None:
        """Frees `nbytes` of what `pid` holds on `gpu`, or all of it (the process exited)."""
        with self._lock:
            held = self.procs[gpu].get(pid, 0)
            left = 0 if nbytes is None else max(0, held - nbytes)
            if left:
                self.procs[gpu][pid] = left
            else:
                self.procs[gpu].pop(pid, None)

    def set_utilization(self, pct: float, gpu: int = 0) -> None:
        self.utilization[gpu] = float(pct)

    def readings(self) -> list[GpuReading]:
        with self._lock:
            out = []
            for i, total in enumerate(self.totals):
                used = min(total, self.reserved + sum(self.procs[i].values()))
                out.append(GpuReading(index=i, name=self.name, total=total, used=used, free=total - used,
                                      temperature_c=round(30.0 + 50.0 * used / total, 1),
                                      utilization_pct=self.utilization[i], processes=dict(self.procs[i])))
            return out

    def close(self) -> None:
        pass


def detect_gpus(simulated: dict | None = None) -> tuple[GpuBackend | None, str]:
    """The backend to use and a line saying what was found.

    `simulated` ({"total_mb": 24564, "name": "SimulatedGPU RTX 4090", "count": 1, "reserved_mb": 0})
    selects the simulation; it is used only when given. Otherwise NVML when it finds a GPU, else
    (None, "no GPU: <why>")."""
    if simulated:
        count = int(simulated.get("count", 1))
        sim = SimulatedGPU([int(simulated["total_mb"]) * MIB] * count, simulated.get("name") or "SimulatedGPU",
                           reserved_bytes=int(simulated.get("reserved_mb", 0)) * MIB)
        return sim, f"simulated: {count} x {sim.name}, {simulated['total_mb']} MiB (a simulation, no hardware)"
    try:
        gpus = NvmlGpus()
    except NoGpu as exc:
        return None, f"no GPU: {exc}"
    return gpus, "NVML: " + ", ".join(f"GPU {i} {n}" for i, n in enumerate(gpus.names))


# --- estimates ---------------------------------------------------------------------------------

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 * MIB   # the safetensors format's own limit


class EstimateError(Exception):
    """A model's files cannot be read for an estimate; the message names the file and what is wrong."""


@dataclass
class WeightsEstimate:
    bytes: int                       # in memory, after any dtype conversion on load
    params: int
    tensors: int
    by_dtype: dict[str, int]         # stored dtype -> parameters
    files: list[str]
    metadata: dict[str, str]         # the headers' __metadata__, merged


@dataclass
class ModelEstimate:
    weights: int
    activations: int
    detail: str

    @property
    def total(self) -> int:
        return self.weights + self.activations


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file: 8 bytes little-endian length, then that much JSON."""
    path = Path(path)
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise EstimateError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or n > path.stat().st_size - 8:
            raise EstimateError(f"{path}: not a safetensors file (header length {n} is past the file's end)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise EstimateError(f"{path}: safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise EstimateError(f"{path}: safetensors header is not a JSON object")
    return header


def estimate_safetensors(path: str | Path, *, load_dtype: str | None = None) -> WeightsEstimate:
    """Weights of one .safetensors file, or of every .safetensors file under a directory (sharded
    checkpoints, sentence-transformers modules), from the headers alone. `load_dtype` ("F16",
    "F32", ...) is the dtype floating-point tensors are converted to on load; None keeps the stored one."""
    path = Path(path)
    if load_dtype is not None and load_dtype not in DTYPE_BYTES:
        raise EstimateError(f"unknown dtype {load_dtype!r}: use one of {sorted(DTYPE_BYTES)}")
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise EstimateError(f"{path}: no .safetensors file in this directory")
    total = params = tensors = 0
    by_dtype: dict[str, int] = {}
    metadata: dict[str, str] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name == "__metadata__":
                metadata.update(info or {})
                continue
            try:
                dtype, shape = info["dtype"], info["shape"]
                numel = math.prod(int(d) for d in shape)
            except (KeyError, TypeError, ValueError):
                raise EstimateError(f"{file}: tensor {name!r} has no readable dtype and shape") from None
            size = DTYPE_BYTES.get(load_dtype if load_dtype and dtype in FLOAT_DTYPES else dtype)
            if size is None:   # a dtype newer than this table: its byte range in the file is exact
                start, end = info.get("data_offsets", (0, 0))
                total += int(end) - int(start)
            else:
                total += numel * size
            params += numel
            tensors += 1
            by_dtype[dtype] = by_dtype.get(dtype, 0) + numel
    return WeightsEstimate(bytes=total, params=params, tensors=tensors, by_dtype=by_dtype,
                           files=[str(f) for f in files], metadata=metadata)


def _first(config: dict, *keys: str, default: int | None = None) -> int | None:
    for k in keys:
        if isinstance(config.get(k), int):
            return config[k]
    return default


def estimate_sentence_transformer(model_dir: str | Path, batch_size: int = 32, max_seq_length: int | None = None,
                                  *, dtype: str = "F32") -> ModelEstimate:
    """Memory of a sentence-transformers model encoding batches of `batch_size` texts.

    Weights: the safetensors headers (or the size of pytorch_model.bin), converted to `dtype`
    (sentence-transformers loads float32 unless told otherwise). Activations: one encoder layer's
    working set at a time (inference keeps no graph): hidden states, Q, K, V, attention output and
    two hidden-size buffers (7 x batch x seq x hidden), the feed-forward intermediate before and
    after its activation (2 x batch x seq x intermediate) and the attention scores and their softmax
    (2 x batch x heads x seq^2), in `dtype`. Memory-efficient attention kernels need less; the
    CUDA context of a process that had none is not included. `EstimateBook` corrects what this misses.
    `model_dir`: a directory, or a name `pipeline.embed.resolve_model` knows."""
    path = Path(model_dir)
    if not path.is_dir():
        from pipeline.embed import EmbedderError, resolve_model

        try:
            path = Path(resolve_model(str(model_dir)))
        except EmbedderError as exc:
            raise EstimateError(f"{model_dir}: not a local model directory ({exc})") from None
        if not path.is_dir():
            raise EstimateError(f"{model_dir}: not a local model directory (resolves to {path}); download it first")
    if batch_size < 1:
        raise EstimateError(f"batch_size must be at least 1, got {batch_size}")
    transformer = path
    modules = path / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("models.Transformer"):
                transformer = path / m.get("path", "")
                break
    config_file = transformer / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if max_seq_length is None:
        st_config = transformer / "sentence_bert_config.json"
        if st_config.is_file():
            max_seq_length = json.loads(st_config.read_text()).get("max_seq_length")
        max_seq_length = max_seq_length or _first(config, "max_position_embeddings", "n_positions", default=512)
    if any(path.rglob("*.safetensors")):
        weights = estimate_safetensors(path, load_dtype=dtype).bytes
        source = "safetensors headers"
    else:
        bins = list(path.rglob("pytorch_model*.bin"))
        if not bins:
            raise EstimateError(f"{path}: no model weights (*.safetensors or pytorch_model.bin)")
        weights = sum(b.stat().st_size for b in bins)
        source = "pytorch_model.bin size"
    hidden = _first(config, "hidden_size", "d_model", "dim", default=768)
    heads = _first(config, "num_attention_heads", "n_heads", "n_head", default=max(1, hidden // 64))
    inter = _first(config, "intermediate_size", "hidden_dim", "ffn_dim", "n_inner", default=4 * hidden)
    b, s, width = batch_size, int(max_seq_length), DTYPE_BYTES.get(dtype, 4)
    activations = width * (b * s * (7 * hidden + 2 * inter) + 2 * b * heads * s * s)
    detail = (f"weights {weights / MIB:.0f} MiB ({source}, {dtype}), activations {activations / MIB:.0f} MiB "
              f"(batch {b} x {s} tokens, hidden {hidden}, {heads} heads, intermediate {inter})")
    return ModelEstimate(weights=weights, activations=activations, detail=detail)


class EstimateBook:
    """Per model, measured over estimated bytes, so the next estimate of that model is corrected.

    A new measurement moves the ratio halfway (one odd load does not decide it alone); ratios are
    kept within [0.1, 10]. With a path the book is a small JSON file that survives restarts."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.ratios: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.ratios = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.ratios = {}   # a damaged book only costs the corrections

    def record(self, model: str, estimated: int, measured: int) -> float:
        if estimated <= 0 or measured <= 0:
            return self.ratios.get(model, 1.0)
        ratio = min(10.0, max(0.1, measured / estimated))
        old = self.ratios.get(model)
        self.ratios[model] = ratio if old is None else (old + ratio) / 2
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ratios, indent=1, sort_keys=True))
            tmp.replace(self.path)
        return self.ratios[model]

    def correct(self, model: str, estimated: int) -> int:
        return math.ceil(estimated * self.ratios.get(model, 1.0))


# --- the lease policy --------------------------------------------------------------------------

GRANTED, WAITING, REVOKING = "granted", "waiting", "revoking"


class PolicyError(Exception):
    """A request the policy refuses as malformed or not allowed; nothing was changed."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Lease:
    id: str
    agent: str
    model: str
    bytes: int                 # counted against the budget: the request, corrected, then measured
    requested: int             # what the holder asked for
    priority: int
    state: str                 # granted | waiting | revoking
    gpu: int | None = None     # None: CPU (there is no GPU)
    instance: str = ""         # the holder's process instance, when it said
    pid: int | None = None
    seq: int = 0               # arrival order: first come, first served among equal priorities
    created: float = 0.0
    granted_at: float | None = None
    last_used: float = 0.0     # LRU and keep-alive
    last_seen: float = 0.0     # renewal: a holder that stops renewing is reclaimed after the TTL
    revoked_at: float | None = None
    reason: str = ""           # why it waits, was revoked, or ended

    @property
    def device(self) -> str:
        """Where to load: cuda:N, or cpu; empty while waiting."""
        if self.state == WAITING:
            return ""
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


@dataclass
class Decision:
    status: str                                  # granted | wait | denied
    lease: Lease | None = None                   # None when denied
    reason: str = ""
    position: int | None = None                  # 1 = next to be served
    revoke: list[Lease] = field(default_factory=list)   # leases now asked to unload to make room


@dataclass
class Changes:
    """What one call did to other leases: waiters granted, holders asked to unload, leases dropped."""

    granted: list[Lease] = field(default_factory=list)
    revoke: list[Lease] = field(default_factory=list)
    reclaimed: list[Lease] = field(default_factory=list)

    def __iadd__(self, other: Changes) -> Self:
        self.granted += other.granted
        self.revoke += other.revoke
        self.reclaimed += other.reclaimed
        return self

    def __bool__(self) -> bool:
        return bool(self.granted or self.revoke or self.reclaimed)


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB"


class LeasePolicy:
    """Leases of GPU memory, decided one call at a time.

    * `acquire` grants when the request fits on a GPU (the one with most room) and nobody of equal
      or higher priority waits; a request larger than the largest budget is denied; anything else
      waits. Waiters are served strictly by priority, then arrival.
    * When the first waiter does not fit, the least recently used leases of lower priority on one
      GPU are revoked (asked to unload) until it would; if only leases of equal or higher priority
      stand in the way, it waits without revoking anything. A revoked lease still counts until its
      holder releases it, or until `revoke_grace_s` has passed, when it is reclaimed.
    * `expire` asks holders of leases unused for `keep_alive_s` to unload (reason idle) and drops
      leases not renewed for `lease_ttl_s`.
    * No GPU at all (no budgets): every acquire is granted, placed on the CPU.
    """

    def __init__(self, budgets: Sequence[int], *, keep_alive_s: float | None = 300.0, revoke_grace_s: float = 30.0,
                 lease_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.budgets = [int(b) for b in budgets]
        self.external = [0 for _ in self.budgets]   # used outside any lease (other processes, over-use)
        self.keep_alive_s = keep_alive_s
        self.revoke_grace_s = revoke_grace_s
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self.leases: dict[str, Lease] = {}
        self._seq = itertools.count(1)

    # --- views ---------------------------------------------------------------------------------

    @property
    def has_gpu(self) -> bool:
        return bool(self.budgets)

    def leased(self, gpu: int) -> int:
        """Bytes counted on `gpu`: granted leases and revoked ones not yet released."""
        return sum(lease.bytes for lease in self.leases.values() if lease.gpu == gpu and lease.state != WAITING)

    def free(self, gpu: int) -> int:
        """What can be granted on `gpu` now (negative when it is over budget)."""
        return self.budgets[gpu] - self.external[gpu] - self.leased(gpu)

    def queue(self) -> list[Lease]:
        return sorted((w for w in self.leases.values() if w.state == WAITING), key=lambda w: (-w.priority, w.seq))

    def position(self, lease: Lease) -> int | None:
        if lease.state != WAITING:
            return None
        return next(i for i, w in enumerate(self.queue(), 1) if w.id == lease.id)

    def get(self, lease_id: str, agent: str | None = None) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise PolicyError("unknown_lease", f"no lease {lease_id!r} (released, reclaimed, or never granted)")
        if agent is not None and lease.agent != agent:
            raise PolicyError("not_holder", f"lease {lease_id} is held by {lease.agent!r}, not {agent!r}")
        return lease

    # --- requests --------------------------------------------------------------------------------

    @staticmethod
    def check_request(agent: str, model: str, nbytes: int, priority: int) -> None:
        """Raises PolicyError (invalid_request) for a request `acquire` would refuse as malformed."""
        for what, value in (("agent", agent), ("model", model)):
            if not isinstance(value, str) or not value.strip():
                raise PolicyError("invalid_request", f"{what} must be a non-empty name")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError("invalid_request", f"bytes must be a whole number >= 0, got {nbytes!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise PolicyError("invalid_request", f"priority must be a whole number, got {priority!r}")

    def acquire(self, agent: str, model: str, nbytes: int, priority: int = 0, *, instance: str = "",
                pid: int | None = None, wait: bool = True) -> Decision:
        """Granted now, wait (queued, with its position), or denied (with the reason); see the class."""
        self.check_request(agent, model, nbytes, priority)
        now = self.clock()
        lease = Lease(id=uuid.uuid4().hex[:12], agent=agent, model=model, bytes=nbytes, requested=nbytes,
                      priority=priority, state=WAITING, instance=instance, pid=pid, seq=next(self._seq), created=now,
                      last_used=now, last_seen=now)
        if not self.has_gpu:
            lease.state, lease.granted_at, lease.reason = GRANTED, now, "no GPU: placed on the CPU"
            self.leases[lease.id] = lease
            return Decision("granted", lease, reason=lease.reason)
        largest = max(self.budgets)
        if nbytes > largest:
            return Decision("denied", reason=f"{model} needs {mib(nbytes)}, more than the whole budget of the "
                                             f"largest GPU ({mib(largest)}: its memory minus the headroom)")
        ahead = [w for w in self.queue() if w.priority >= priority]
        if not ahead:
            gpu = self._fitting_gpu(nbytes)
            if gpu is not None:
                self._grant(lease, gpu, now)
                self.leases[lease.id] = lease
                return Decision("granted", lease)
        if not wait:
            best = max(range(len(self.budgets)), key=self.free)
            why = (f"{len(ahead)} request(s) of equal or higher priority wait" if ahead
                   else f"only {mib(max(0, self.free(best)))} free on GPU {best}")
            return Decision("denied", reason=f"{model} needs {mib(nbytes)} now and {why}")
        self.leases[lease.id] = lease
        changes = self._serve()
        if lease.state == GRANTED:
            return Decision("granted", lease, revoke=changes.revoke)
        lease.reason = self._wait_reason(lease, changes.revoke)
        return Decision("wait", lease, reason=lease.reason, position=self.position(lease), revoke=changes.revoke)

    def release(self, lease_id: str, agent: str | None = None) -> Changes:
        """The holder unloaded (or no longer waits): its bytes are free, waiters may be served."""
        lease = self.get(lease_id, agent)
        del self.leases[lease_id]
        lease.reason = "released"
        return self._serve()

    def touch(self, lease_id: str, agent: str | None = None, *, used: bool = True) -> Lease:
        """Renews the lease (its holder is alive); `used`: the model was just used (LRU, keep-alive)."""
        lease = self.get(lease_id, agent)
        now = self.clock()
        lease.last_seen = now
        if used and lease.state != WAITING:
            lease.last_used = now
        return lease

    def resize(self, lease_id: str, nbytes: int) -> Changes:
        """The lease's size as measured after loading. It may now be over budget: nothing more is
        granted on that GPU until there is room again."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError("invalid_request", f"bytes must be a whole number >= 0, got {nbytes!r}")
        self.get(lease_id).bytes = nbytes
        return self._serve()

    def observe(self, gpu: int, used: int, total: int) -> Changes:
        """A device reading: memory used beyond the leases and the headroom is someone else's (a
        process without a lease, a holder using more than it said), and is not granted again."""
        headroom = total - self.budgets[gpu]
        self.external[gpu] = max(0, int(used) - self.leased(gpu) - headroom)
        return self._serve()

    def reclaim(self, agent: str, reason: str, *, keep_instance: str | None = None) -> Changes:
        """Drops every lease `agent` holds or waits for (its process is gone); with `keep_instance`,
        only those taken by another instance of it."""
        changes = Changes()
        for lease in list(self.leases.values()):
            if lease.agent != agent:
                continue
            if keep_instance is not None and lease.instance in ("", keep_instance):
                continue
            self._drop(lease, reason, changes)
        changes += self._serve()
        return changes

    def expire(self) -> Changes:
        """Time-driven changes: idle leases asked to unload, unrenewed and unreleased ones dropped."""
        now = self.clock()
        changes = Changes()
        for lease in list(self.leases.values()):
            if now - lease.last_seen > self.lease_ttl_s:
                self._drop(lease, f"not renewed for {self.lease_ttl_s:g}s", changes)
            elif lease.state == REVOKING and now - lease.revoked_at > self.revoke_grace_s:
                self._drop(lease, f"not released within {self.revoke_grace_s:g}s of its revocation", changes)
            elif (lease.state == GRANTED and lease.gpu is not None and self.keep_alive_s is not None
                  and now - lease.last_used > self.keep_alive_s):
                self._revoke(lease, "idle", now)
                changes.revoke.append(lease)
        changes += self._serve()
        return changes

    # --- internals -------------------------------------------------------------------------------

    def _grant(self, lease: Lease, gpu: int, now: float) -> None:
        lease.state, lease.gpu, lease.granted_at, lease.reason = GRANTED, gpu, now, ""
        lease.last_used = now

    def _revoke(self, lease: Lease, reason: str, now: float) -> None:
        lease.state, lease.revoked_at, lease.reason = REVOKING, now, reason

    def _drop(self, lease: Lease, reason: str, changes: Changes) -> None:
        del self.leases[lease.id]
        lease.reason = reason
        changes.reclaimed.append(lease)

    def _fitting_gpu(self, nbytes: int) -> int | None:
        """The GPU with most room, among those where `nbytes` fits now."""
        room = [(self.free(g), -g) for g in range(len(self.budgets)) if self.free(g) >= nbytes]
        return -max(room)[1] if room else None

    def _serve(self) -> Changes:
        """Grants waiters in order while the first one fits; makes room for the first that does not."""
        changes = Changes()
        now = self.clock()
        for head in self.queue():
            gpu = self._fitting_gpu(head.bytes)
            if gpu is None:
                changes.revoke += self._make_room(head, now)
                break
            self._grant(head, gpu, now)
            changes.granted.append(head)
        return changes

    def _make_room(self, head: Lease, now: float) -> list[Lease]:
        """Revokes the fewest least-recently-used lower-priority leases on one GPU that let `head`
        fit once released; nothing when a revocation already under way will do, or when nothing will."""
        plans = []
        for g, budget in enumerate(self.budgets):
            if budget < head.bytes:
                continue
            pending = sum(lease.bytes for lease in self.leases.values() if lease.gpu == g and lease.state == REVOKING)
            need = head.bytes - self.free(g) - pending
            if need <= 0:
                return []
            chosen, got = [], 0
            for lease in sorted((x for x in self.leases.values()
                                 if x.gpu == g and x.state == GRANTED and x.priority < head.priority),
                                key=lambda x: (x.last_used, x.seq)):
                if got >= need:
                    break
                chosen.append(lease)
                got += lease.bytes
            if got >= need:
                plans.append((len(chosen), got, g, chosen))
        if not plans:
            return []
        _, _, _, chosen = min(plans, key=lambda p: p[:3])
        for lease in chosen:
            self._revoke(lease, "priority", now)
        return chosen

    def _wait_reason(self, lease: Lease, revoked: list[Lease]) -> str:
        ahead = self.position(lease) - 1
        if revoked:
            return f"waits for {len(revoked)} lease(s) of lower priority to unload"
        if ahead:
            return f"waits behind {ahead} request(s) of equal or higher priority"
        if any(x.state == REVOKING for x in self.leases.values()):
            return "waits for a revoked lease to be released"
        return "waits: only leases of equal or higher priority hold the memory it needs"
