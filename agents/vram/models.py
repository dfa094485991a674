"""The GGUF model manager (kind model_manager): loads, serves and unloads llama.cpp models under VRAM leases.

Models are named in the settings (`models: {name: {path, n_ctx, ...}}`) and loaded on first use, or at start with
`preload: true`. Before a load the manager sizes the model from its GGUF header (agents/vram/gguf.py: the offloaded
blocks, the output head, the KV cache for n_ctx, a compute buffer) and asks the VRAM optimizer for that much
(agents/gpu.py, VramClient):

    granted on cuda:N -> loaded with n_gpu_layers offloaded (all by default), then `lease.loaded()`: the optimizer
                         measures the NVML delta and corrects its estimate for this model
    granted on cpu    -> the optimizer has no GPU: loaded on the CPU
    wait              -> requests queue until the grant comes (a request's Deferred reply waits with them)
    denied            -> the model is larger than the whole GPU budget: the manager asks for the blocks that fit
                         (partial offload, `n_gpu_layers` = layers_that_fit(budget)); none fit: the CPU, no lease

A revoke (`idle`: unused for the optimizer's keep-alive; `priority`: a more important model needs the memory)
unloads the model once its requests in flight are done, then releases the lease; the next request loads it again.
With no optimizer in the mesh a model is loaded as configured and unloaded after its own `keep_alive_s` idle.

Requests: `model.generate` and `model.embed` (answered when done, by Deferred replies: a load or a long generation
does not block the agent), `model.list`, `model.unload`. Generation and embedding run on a thread pool; one model
serves one request at a time (a llama.cpp context is not thread-safe), different models in parallel.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agents.contracts import (
    Embed,
    Embedded,
    Generate,
    Generated,
    ModelInfo,
    ModelsReply,
    ModelsRequest,
    Unload,
    VramStatus,
    VramStatusRequest,
)
from agents.gpu import VramClient, VramLease
from agents.vram.gguf import GgufError, GgufInfo, LlamaModel, estimate, layers_that_fit
from mesh.config import AgentRef
from mesh.runtime import Agent, AgentSettings, handles
from network.codec import Envelope
from network.messages import Ack
from network.rpc import Deferred, MeshError


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="the .gguf file (relative: under data_dir/models)")
    n_ctx: int = Field(2048, ge=16, le=1 << 20, description="context length (sizes the KV cache)")
    embedding: bool = Field(False, description="load for model.embed (such a model does not generate)")
    priority: int = Field(0, description="VRAM priority: a higher one may revoke a lower one's lease")
    n_gpu_layers: int = Field(-1, ge=-1, description="blocks offloaded when on a GPU (-1: all)")
    keep_alive_s: float = Field(300.0, gt=0, description="unload after this long unused (without a VRAM optimizer; "
                                "with one, its keep_alive_s asks for the unload)")
    preload: bool = Field(False, description="load when the agent starts, not on first use")
    threads: int | None = Field(None, ge=1, le=256, description="CPU threads (default: llama.cpp's)")


class ModelManagerSettings(AgentSettings):
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    vram_optimizer: AgentRef("vram_optimizer", auto=True) | None = Field("auto", description="the VRAM optimizer agent; auto: the config's one, if any; "
                                       "null: none (load as configured)")
    workers: int = Field(2, ge=1, le=64, description="threads that load and run models")


class Slot:
    """One configured model and where it stands."""

    def __init__(self, name: str, spec: ModelSpec, path: Path):
        self.name, self.spec, self.path = name, spec, path
        self.state = "unloaded"             # unloaded | waiting | loading | loaded | failed
        self.model: LlamaModel | None = None
        self.lease: VramLease | None = None
        self.placement = ""
        self.n_gpu_layers = 0
        self.estimate = 0
        self.waiters: list[tuple[Callable[[LlamaModel], Any], Deferred]] = []
        self.busy = 0
        self.unload_when_idle = False
        self.last_used = time.monotonic()
        self.requests = 0
        self.error = ""
        self.info: GgufInfo | None = None


class ModelManager(Agent):
    kind = "model_manager"
    image = "model"   # needs the `model` extra (podman_build.sh: the model image)
    Settings = ModelManagerSettings

    def __init__(self, name, config) -> None:
        super().__init__(name, config)
        s = self.settings
        base = config.mesh.data_dir / "models"
        self.slots = {n: Slot(n, spec, Path(spec.path) if Path(spec.path).is_absolute() else base / spec.path)
                      for n, spec in s.models.items()}
        self.pool = ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="model")
        self.vram: VramClient | None = None

    def setup(self) -> None:
        self.vram = VramClient(self, self.settings.vram_optimizer)
        self.reactor.every(5.0, self._keep_alive)

    def on_ready(self) -> None:
        for slot in self.slots.values():
            if not slot.path.is_file():
                self.log.warning("model %s: %s does not exist (requests for it will fail)", slot.name, slot.path)
            elif slot.spec.preload:
                self._load(slot)

    def on_drain(self) -> None:
        for slot in self.slots.values():
            if slot.state in ("loaded", "loading", "waiting"):
                self._unload(slot, "stopping", wait=True)
        self.pool.shutdown(wait=True, cancel_futures=True)

    # --- requests ---------------------------------------------------------------------------------

    def _slot(self, name: str) -> Slot:
        slot = self.slots.get(name)
        if slot is None:
            raise MeshError("unknown_model", f"no model {name!r} here: one of {sorted(self.slots)}")
        return slot

    @handles(Generate)
    def on_generate(self, msg: Generate, env: Envelope) -> Deferred:
        slot = self._slot(msg.model)
        if slot.spec.embedding:
            raise MeshError("bad_request", f"model {msg.model!r} is loaded for embeddings (embedding: true): it does "
                                           "not generate")

        def run(model: LlamaModel) -> Generated:
            started = time.monotonic()
            text, tokens, finish = model.generate(msg.prompt, max_tokens=msg.max_tokens, temperature=msg.temperature,
                                                  top_p=msg.top_p, stop=msg.stop, seed=msg.seed,
                                                  ignore_eos=msg.ignore_eos)
            return Generated(model=msg.model, text=text, tokens=tokens, finish=finish,
                             elapsed_s=round(time.monotonic() - started, 4), placement=slot.placement)

        return self._submit(slot, run)

    @handles(Embed)
    def on_embed(self, msg: Embed, env: Envelope) -> Deferred:
        slot = self._slot(msg.model)
        if not slot.spec.embedding:
            raise MeshError("bad_request", f"model {msg.model!r} is not loaded for embeddings: set embedding: true")

        def run(model: LlamaModel) -> Embedded:
            vectors = model.embed(msg.texts)
            return Embedded(model=msg.model, dim=int(vectors.shape[1]), vectors=vectors.astype("<f4").tobytes())

        return self._submit(slot, run)

    @handles(ModelsRequest)
    def on_list(self, msg: ModelsRequest, env: Envelope) -> ModelsReply:
        now = time.monotonic()
        return ModelsReply(models=[ModelInfo(
            name=s.name, path=str(s.path), state=s.state, placement=s.placement, n_gpu_layers=s.n_gpu_layers,
            estimate_bytes=s.estimate, lease=s.lease.id if s.lease is not None and s.lease.id else None,
            idle_s=round(now - s.last_used, 1) if s.state == "loaded" else None, requests=s.requests,
            error=s.error) for s in self.slots.values()],
            gpu=self.vram.optimizer or "no VRAM optimizer" if self.vram is not None else "")

    @handles(Unload)
    def on_unload(self, msg: Unload, env: Envelope) -> Ack:
        self._unload(self._slot(msg.model), "asked")
        return Ack()

    # --- running ----------------------------------------------------------------------------------

    def _submit(self, slot: Slot, fn: Callable[[LlamaModel], Any]) -> Deferred:
        reply = Deferred()
        slot.requests += 1
        if slot.state == "loaded" and not slot.unload_when_idle:
            self._run(slot, fn, reply)
        else:
            slot.waiters.append((fn, reply))
            self._load(slot)
        return reply

    def _run(self, slot: Slot, fn: Callable[[LlamaModel], Any], reply: Deferred) -> None:
        slot.busy += 1
        slot.last_used = time.monotonic()
        if slot.lease is not None:
            slot.lease.touch()
        model = slot.model
        future = self.pool.submit(fn, model)
        future.add_done_callback(lambda f: self.reactor.call_soon_threadsafe(lambda: self._ran(slot, f, reply)))

    def _ran(self, slot: Slot, future, reply: Deferred) -> None:
        slot.busy -= 1
        slot.last_used = time.monotonic()
        exc = future.exception()
        if exc is None:
            reply.resolve(future.result())
        elif isinstance(exc, GgufError):
            reply.fail("bad_request", str(exc))
        else:
            self.log.error("model %s: %s: %s", slot.name, type(exc).__name__, exc)
            reply.fail("handler_error", f"model {slot.name}: {type(exc).__name__}: {exc}")
        if slot.unload_when_idle and slot.busy == 0:
            self._unload(slot, "revoked")

    def _fail_waiters(self, slot: Slot, code: str, message: str) -> None:
        waiters, slot.waiters = slot.waiters, []
        for _, reply in waiters:
            reply.fail(code, message)

    # --- loading and unloading --------------------------------------------------------------------

    def _load(self, slot: Slot) -> None:
        if slot.state in ("waiting", "loading"):
            return
        if slot.state == "loaded":      # revoked and still busy: load again once unloaded
            return
        try:
            slot.info = GgufInfo.read(slot.path)
        except GgufError as exc:
            slot.state, slot.error = "failed", str(exc)
            self._fail_waiters(slot, "unavailable", f"model {slot.name}: {exc}")
            return
        slot.state, slot.error = "waiting", ""
        slot.n_gpu_layers = slot.spec.n_gpu_layers
        slot.estimate = estimate(slot.info, slot.spec.n_ctx, slot.n_gpu_layers)
        self._acquire(slot, wait=True)

    def _acquire(self, slot: Slot, *, wait: bool) -> None:
        slot.lease = self.vram.acquire(slot.name, slot.estimate, slot.spec.priority,
                                       on_granted=lambda lease: self._granted(slot, lease),
                                       on_revoke=lambda lease, why: self._revoked(slot, lease, why),
                                       on_denied=lambda lease: self._denied(slot, lease), wait=wait)

    def _granted(self, slot: Slot, lease: VramLease) -> None:
        if lease is not slot.lease or slot.state != "waiting":
            lease.release()
            return
        if lease.device.startswith("cuda"):
            layers = slot.n_gpu_layers
            slot.placement = lease.device if layers < 0 else f"{lease.device} ({layers}/{slot.info.n_layers} layers)"
        elif lease.device == "cpu":
            layers, slot.placement = 0, "cpu"
        else:   # no optimizer: as configured, where llama.cpp can offload at all
            layers = slot.n_gpu_layers if _gpu_offload() else 0
            slot.placement = "gpu" if layers else "cpu"
        slot.n_gpu_layers = layers
        self._start_load(slot)

    def _denied(self, slot: Slot, lease: VramLease) -> None:
        """Larger than the whole budget (or no optimizer answered): the blocks that fit, else the CPU."""
        if lease is not slot.lease or slot.state != "waiting":
            return
        self.log.warning("model %s: %d MiB denied: %s", slot.name, slot.estimate >> 20, lease.reason)
        if self.vram.optimizer is None or slot.n_gpu_layers == 0:
            self._cpu(slot, lease.reason)
            return

        def status(reply: VramStatus) -> None:
            budget = max((g.budget for g in reply.gpus), default=0)
            layers = layers_that_fit(slot.info, budget, slot.spec.n_ctx) if reply.gpus else 0
            if layers == 0 or layers == slot.n_gpu_layers:
                self._cpu(slot, lease.reason)
                return
            slot.n_gpu_layers = layers if layers > 0 else slot.info.n_layers
            slot.estimate = estimate(slot.info, slot.spec.n_ctx, slot.n_gpu_layers)
            self.log.info("model %s: partial offload, %d of %d blocks (%d MiB)", slot.name, slot.n_gpu_layers,
                          slot.info.n_layers, slot.estimate >> 20)
            self._acquire(slot, wait=True)

        self.peer(self.vram.optimizer).request(VramStatusRequest(), status,
                                               lambda exc: self._cpu(slot, f"{lease.reason}; {exc.message}"))

    def _cpu(self, slot: Slot, why: str) -> None:
        slot.lease, slot.n_gpu_layers, slot.estimate = None, 0, 0
        slot.placement = "cpu"
        self.log.info("model %s: on the CPU (%s)", slot.name, why)
        self._start_load(slot)

    def _start_load(self, slot: Slot) -> None:
        slot.state = "loading"
        spec, layers = slot.spec, slot.n_gpu_layers

        def load() -> LlamaModel:
            return LlamaModel(slot.path, n_ctx=spec.n_ctx, n_gpu_layers=layers, embedding=spec.embedding,
                              n_threads=spec.threads)

        future = self.pool.submit(load)
        future.add_done_callback(lambda f: self.reactor.call_soon_threadsafe(lambda: self._loaded(slot, f)))

    def _loaded(self, slot: Slot, future) -> None:
        exc = future.exception()
        if exc is not None:
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            self.log.error("model %s: load failed: %s", slot.name, slot.error)
            if slot.lease is not None:
                slot.lease.release()
                slot.lease = None
            self._fail_waiters(slot, "unavailable", f"model {slot.name}: {slot.error}")
            return
        slot.model, slot.state, slot.last_used = future.result(), "loaded", time.monotonic()
        self.log.info("model %s loaded in %.2fs: %s, %d MiB estimated", slot.name, slot.model.load_s, slot.placement,
                      slot.estimate >> 20)
        if slot.lease is not None:
            slot.lease.loaded()
        waiters, slot.waiters = slot.waiters, []
        for fn, reply in waiters:
            self._run(slot, fn, reply)
        if slot.unload_when_idle and slot.busy == 0:   # revoked while it loaded
            self._unload(slot, "revoked")

    def _revoked(self, slot: Slot, lease: VramLease, why: str) -> None:
        if lease is not slot.lease:
            return
        self.log.info("model %s: lease revoked (%s): unloading", slot.name, why)
        if slot.state == "waiting":
            slot.lease = None
            slot.state = "unloaded"
            if slot.waiters:
                self._load(slot)
            return
        slot.unload_when_idle = True
        if slot.busy == 0 and slot.state == "loaded":
            self._unload(slot, why)

    def _unload(self, slot: Slot, why: str, *, wait: bool = False) -> None:
        model, lease = slot.model, slot.lease
        if slot.busy and not wait:
            slot.unload_when_idle = True
            return
        slot.model, slot.lease, slot.unload_when_idle = None, None, False
        slot.state, slot.placement = "unloaded", ""
        if model is not None:
            self.log.info("model %s unloaded (%s)", slot.name, why)
        self._fail_waiters(slot, "unavailable", f"model {slot.name} was unloaded ({why}); ask again") if why == "stopping" \
            else None

        def close() -> None:
            if model is not None:
                model.close()

        def closed(_f) -> None:
            if lease is not None:
                lease.release()     # any thread
            if slot.waiters and why != "stopping":
                self.reactor.call_soon_threadsafe(lambda: self._load(slot))

        if wait:
            close()
            closed(None)
        else:
            self.pool.submit(close).add_done_callback(closed)

    def _keep_alive(self) -> None:
        if self.vram is not None and self.vram.optimizer is not None:
            return      # the optimizer's keep_alive_s asks for the unload
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.state == "loaded" and slot.busy == 0 and now - slot.last_used > slot.spec.keep_alive_s:
                self._unload(slot, f"idle for {slot.spec.keep_alive_s:g} s")


def _gpu_offload() -> bool:
    try:
        import llama_cpp  # deferred: heavy, and its shared library may fail to load

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def vectors(reply: Embedded) -> np.ndarray:
    """The rows of a model.embedded reply."""
    return np.frombuffer(reply.vectors, dtype="<f4").reshape(-1, reply.dim)
