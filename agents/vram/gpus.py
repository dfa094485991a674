"""The GPUs as the VRAM optimizer reads them.

`NvmlGpus` reads every NVIDIA GPU through NVML (nvidia-ml-py): total, used and free memory, memory
per process, temperature, utilisation. `SimulatedGPU` is a stand-in for tests and for trying the
policy on a machine without a GPU: it is a simulation, named as such in every reading, and
`allocate` / `free` per pid move its readings the way a model load moves NVML's. `detect_gpus`
picks the simulation only when asked to, else NVML, else no GPU at all; no GPU is a normal outcome,
not an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pynvml

from agents.gpu import MIB

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

