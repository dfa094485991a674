"""The GPU as an agent that loads models sees it: which device to use, how much memory a model
needs, and the lease it asks the VRAM optimizer for before loading.

* `resolve_device`: `auto`, `cpu`, `cuda`, `cuda:N` to a device torch can use (the one resolver).
* Estimates. `estimate_safetensors` sums dtype x shape over the tensors a safetensors header lists
  (the header only: no weights are read, no torch needed); `estimate_sentence_transformer` adds what
  one forward pass of a batch needs on top of the weights.
* `VramClient` / `VramLease`: the holder's side of the lease protocol (agents/contracts.py has its
  messages; agents/vram/agent.py is the optimizer).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agents.contracts import (
    GRANTED,
    VramAcquire,
    VramDecision,
    VramGranted,
    VramLeaseState,
    VramRelease,
    VramRevoke,
    VramTouch,
)
from mesh.runtime import Agent
from network.codec import Envelope
from network.rpc import MeshError

MIB = 1 << 20
log = logging.getLogger(__name__)


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB"


class DeviceError(Exception):
    """The requested device is not there."""


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; ``"cpu"``; ``"cuda"`` / ``"cuda:N"``.

    DeviceError for a CUDA device when CUDA is not available (or N is out of range) and for anything else.
    """
    import torch  # deferred: a heavy import that only model-loading agents need

    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if device != "cuda":
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise DeviceError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return device
    raise DeviceError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")



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
    `model_dir`: the model's directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise EstimateError(f"{model_dir}: not a local model directory (a model name: resolve it first with "
                            f"agents.embedding.resolve_model)")
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



# --- the holder's side of a lease ---------------------------------------------------------------


class VramLease:
    """One model's lease, as its holder sees it.

    status: pending -> waiting -> granted -> revoked (asked to unload) -> released; or denied.
    `device` is where to load: cuda:N, cpu (the optimizer has no GPU), or auto (no optimizer
    in this mesh: the holder chooses as it would without one)."""

    def __init__(self, client: VramClient, model: str, nbytes: int, priority: int, on_granted, on_revoke, on_denied):
        self.client = client
        self.model = model
        self.nbytes = nbytes
        self.priority = priority
        self.id = ""
        self.status = "pending"
        self.device = ""
        self.gpu: int | None = None
        self.position: int | None = None
        self.reason = ""
        self.on_granted: Callable[[VramLease], None] = on_granted
        self.on_revoke: Callable[[VramLease, str], None] = on_revoke
        self.on_denied: Callable[[VramLease], None] = on_denied
        self._used_sent = 0.0
        self._used_pending = False

    @property
    def granted(self) -> bool:
        return self.status == "granted"

    def touch(self) -> None:
        """The model was used (LRU, keep-alive). Cheap: at most one request a second; any thread."""
        self.client._call(lambda: self.client._touch(self, used=True))

    def loaded(self) -> None:
        """The model is in memory now: the optimizer measures what it took. Any thread."""
        self.client._call(lambda: self.client._touch(self, used=True, loaded=True, now=True))

    def release(self) -> None:
        """The model is unloaded (or no longer wanted while waiting). Any thread."""
        self.client._call(lambda: self.client._release(self))

    def __repr__(self) -> str:
        return f"VramLease({self.model!r}, {self.status}, {self.device or '-'}, id={self.id or '-'})"


class VramClient:
    """An agent's link to the VRAM optimizer: `acquire` before loading a model, and the callbacks.

    Create it in `setup()` or later (it subscribes to the optimizer's events); call it from any
    thread (work is handed to the agent's reactor). Callbacks run on the reactor's thread:
    `on_granted(lease)` (load onto lease.device, then `lease.loaded()`), `on_revoke(lease, reason)`
    (unload, then `lease.release()`), `on_denied(lease)` (lease.reason says why; also when the
    optimizer does not answer). Leases are renewed automatically, but only `lease.touch()` says the
    model is in use: call it whenever the model works, or it is asked to unload after the
    optimizer's keep_alive_s. With no optimizer in the mesh every acquire is granted with device "auto"."""

    def __init__(self, agent: Agent, optimizer: str | None = "auto"):
        self.agent = agent
        self.optimizer = agent.config.agent_of_kind("vram_optimizer") if optimizer == "auto" else optimizer
        self.leases: dict[str, VramLease] = {}     # by id: waiting, granted and revoked ones
        self.renew_s = 10.0
        self._owner = threading.get_ident()
        self._renewal = None
        if self.optimizer is not None:
            agent.subscribe(self.optimizer, f"vram.granted.{agent.name}", self._on_granted_event)
            agent.subscribe(self.optimizer, f"vram.revoke.{agent.name}", self._on_revoke_event)

    def acquire(self, model: str, nbytes: int, priority: int = 0, *, on_granted: Callable[[VramLease], None],
                on_revoke: Callable[[VramLease, str], None], on_denied: Callable[[VramLease], None] | None = None,
                wait: bool = True) -> VramLease:
        lease = VramLease(self, model, int(nbytes), priority, on_granted, on_revoke, on_denied or self._log_denied)
        self._call(lambda: self._send_acquire(lease, wait))
        return lease

    # --- on the reactor's thread -------------------------------------------------------------

    def _call(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._owner:
            fn()
        else:
            self.agent.reactor.call_soon_threadsafe(fn)

    def _send_acquire(self, lease: VramLease, wait: bool) -> None:
        if self.optimizer is None:
            lease.status, lease.device, lease.reason = "granted", "auto", "no VRAM optimizer in this mesh"
            self.agent.reactor.call_later(0, lambda: lease.on_granted(lease))
            return
        msg = VramAcquire(agent=self.agent.name, model=lease.model, bytes=lease.nbytes, priority=lease.priority,
                          instance=self.agent.instance, pid=os.getpid(), wait=wait)
        self.agent.peer(self.optimizer).request(msg, lambda reply: self._decided(lease, reply),
                                                lambda exc: self._unanswered(lease, exc))

    def _decided(self, lease: VramLease, reply: VramDecision) -> None:
        if reply.ttl_s:
            self.renew_s = min(self.renew_s, reply.ttl_s / 3)
        if lease.status == "released":          # given up before the answer came
            if reply.lease_id:
                self._send_release(reply.lease_id)
            return
        lease.id, lease.reason, lease.position = reply.lease_id, reply.reason, reply.position
        if reply.status == "denied":
            lease.status = "denied"
            lease.on_denied(lease)
            return
        self.leases[lease.id] = lease
        self._schedule_renewal()
        if reply.status == "granted":
            self._grant(lease, reply.gpu, reply.device)
        else:
            lease.status = "waiting"

    def _unanswered(self, lease: VramLease, exc: MeshError) -> None:
        if lease.status == "released":
            return
        lease.status, lease.reason = "denied", f"VRAM optimizer {self.optimizer}: {exc.message}"
        lease.on_denied(lease)

    def _grant(self, lease: VramLease, gpu: int | None, device: str) -> None:
        lease.status, lease.gpu, lease.device, lease.position = "granted", gpu, device, None
        lease.on_granted(lease)

    def _touch(self, lease: VramLease, *, used: bool = False, loaded: bool = False, now: bool = False) -> None:
        if lease.id not in self.leases or self.optimizer is None:
            return
        if used and not now and time.monotonic() - lease._used_sent < 1.0:
            lease._used_pending = True          # sent with the next renewal
            return
        if used:
            lease._used_sent, lease._used_pending = time.monotonic(), False
        msg = VramTouch(agent=self.agent.name, lease_id=lease.id, used=used, loaded=loaded)
        self.agent.peer(self.optimizer).request(msg, lambda reply: self._renewed(lease, reply),
                                                lambda exc: self._renew_failed(lease, exc))

    def _renewed(self, lease: VramLease, reply: VramLeaseState) -> None:
        """A renewal's answer also says what an event may have failed to: granted, or asked to unload."""
        state = reply.lease.state
        if lease.status == "waiting" and state == GRANTED:
            self._grant(lease, reply.lease.gpu, reply.lease.device)
        elif lease.status == "waiting":
            lease.position = reply.lease.position
        elif lease.status == "granted" and state == "revoking":
            lease.status, lease.reason = "revoked", reply.lease.reason
            lease.on_revoke(lease, reply.lease.reason)

    def _renew_failed(self, lease: VramLease, exc: MeshError) -> None:
        if exc.code == "unknown_lease":
            self._gone(lease, exc.message)
        else:   # the optimizer is away; the lease stands until it answers again (or says it is gone)
            log.warning("%s: cannot renew the lease of %s: %s", self.agent.name, lease.model, exc.message)

    def _gone(self, lease: VramLease, why: str) -> None:
        self.leases.pop(lease.id, None)
        previous = lease.status
        lease.reason = why
        if previous == "waiting":
            lease.status = "denied"
            lease.on_denied(lease)
        elif previous == "granted":
            lease.status = "revoked"
            lease.on_revoke(lease, "reclaimed")

    def _release(self, lease: VramLease) -> None:
        previous, lease.status = lease.status, "released"
        if previous == "pending" or self.leases.pop(lease.id, None) is None:
            return
        self._send_release(lease.id)

    def _send_release(self, lease_id: str) -> None:
        self.agent.peer(self.optimizer).request(
            VramRelease(agent=self.agent.name, lease_id=lease_id), lambda reply: None,
            lambda exc: log.info("%s: release of lease %s: %s", self.agent.name, lease_id, exc.message))

    def _schedule_renewal(self) -> None:
        if self._renewal is None:
            self._renewal = self.agent.reactor.call_later(self.renew_s, self._renew_all)

    def _renew_all(self) -> None:
        self._renewal = None
        for lease in list(self.leases.values()):
            self._touch(lease, used=lease._used_pending, now=True)
        if self.leases:
            self._schedule_renewal()

    def _on_granted_event(self, event: VramGranted, env: Envelope) -> None:
        lease = self.leases.get(event.lease.lease_id)
        if lease is not None and lease.status == "waiting" and event.lease.agent == self.agent.name:
            self._grant(lease, event.lease.gpu, event.lease.device)

    def _on_revoke_event(self, event: VramRevoke, env: Envelope) -> None:
        lease = self.leases.get(event.lease_id)
        if lease is None or event.agent != self.agent.name:
            return
        if event.reason == "reclaimed":
            self._gone(lease, event.detail or "reclaimed")
        elif lease.status == "granted":
            lease.status, lease.reason = "revoked", event.reason
            lease.on_revoke(lease, event.reason)

    def _log_denied(self, lease: VramLease) -> None:
        log.warning("%s: no GPU memory for %s: %s", self.agent.name, lease.model, lease.reason)
