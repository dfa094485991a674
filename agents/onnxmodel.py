"""A sentence-transformers model as int8 ONNX for the CPU: exported offline at first use, cached, run by onnxruntime.

Why. On a CPU host torch runs all-MiniLM-L6-v2 in fp32; onnxruntime with int8 weights (and activations quantised at run
time, on VNNI where the CPU has it) reads the same chunks several times faster, with document vectors within a cosine
of about 0.99 of fp32 (bench/topics.py measures both, in the same run).

Export (`quantized_model`), once per model and cache directory, from the local model only (nothing is downloaded):

  1. the model's transformer (a copy, switched to eager attention) -> ONNX with torch.onnx's TorchScript exporter,
     opset 17, batch and sequence dimensions dynamic; output: the last hidden state;
  2. onnxruntime.transformers' BERT optimizer fuses each layer into one Attention, SkipLayerNormalization and BiasGelu
     (eager attention is the pattern it recognises; torch's SDPA graph is left unfused and runs slower);
  3. onnxruntime.quantization.quantize_dynamic: int8 weights per output channel (MatMul, Attention, Gather).

Mean pooling over the attention mask happens here, in numpy, so only models whose pipeline is a transformer and mean
pooling (and optionally Normalize) are exported (`unsupported` says why not).

Cache: ``<cache_dir>/<model>-<key>/model.onnx`` with ``meta.json`` (the file's sha256, the recipe, versions). The key
hashes the recipe, the onnxruntime version and the source model's config and weights, so another model or version gets
its own entry. An entry is built in a temporary directory beside it and renamed into place complete (a reader sees a
whole entry or none); a file lock keeps two processes from building it twice (the second waits, then uses it); an entry
whose file does not match its recorded sha256 (a crash mid-copy, a truncated or edited file) is moved away and rebuilt.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from store.files import fsync_dir

RECIPE = "torchscript-opset17+ort-bert-fusion+dynamic-qint8-per-channel/1"
MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
log = logging.getLogger(__name__)


class OnnxModelError(Exception):
    """The model cannot be exported to, or loaded as, int8 ONNX."""


def default_cache_dir() -> Path:
    """Where int8 exports are kept: MESH_MODEL_CACHE, else $XDG_CACHE_HOME/agent-mesh/models (~/.cache/...). One
    cache per machine and user, not per mesh: every data_dir (a test's, a second mesh's) reuses one export, and the
    containers point it into their data volume (containers/Containerfile) so it survives a restart."""
    if os.environ.get("MESH_MODEL_CACHE"):
        return Path(os.environ["MESH_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "agent-mesh" / "models"


def unsupported(model) -> str | None:
    """Why this SentenceTransformer cannot run as exported here (None when it can): its modules must be a Transformer,
    a mean Pooling and optionally a Normalize."""
    names = [type(m).__name__ for m in model]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"its modules are {names}, not Transformer, Pooling (mean)[, Normalize]"
    mode = getattr(model[1], "pooling_mode", None) or model[1].get_config_dict().get("pooling_mode")
    if mode is None:   # older sentence-transformers: one flag per mode
        mode = "mean" if model[1].get_config_dict().get("pooling_mode_mean_tokens") else "not mean"
    if mode != "mean":
        return f"it pools by {mode}, not mean"
    return None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(model_dir: Path) -> str:
    """16 hex digits over the recipe, the onnxruntime version and the model's config and weight files."""
    import onnxruntime  # deferred: a heavy optional import, only for the cpu profiles

    h = hashlib.sha256(f"{RECIPE}\0{onnxruntime.__version__}\0".encode())
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise OnnxModelError(f"no weights (*.safetensors, *.bin) in {model_dir}")
    for p in files:
        h.update(f"{p.name}\0".encode())
        h.update(bytes.fromhex(_digest(p)))
    return h.hexdigest()[:16]


def _transformer_dir(model_dir: Path) -> Path:
    """Where the transformer's config and weights are: the first module's path in modules.json."""
    try:
        first = json.loads((model_dir / "modules.json").read_text())[0]
        return model_dir / (first.get("path") or "")
    except (OSError, ValueError, IndexError, KeyError, AttributeError):
        return model_dir


def _slug(model_dir: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", model_dir.resolve().parent.name if model_dir.name == "model"
                  else model_dir.name).strip("-.")[:60] or "model"


def _complete(entry: Path) -> bool:
    """The entry's model file is there and has the sha256 its meta.json records."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        return _digest(entry / MODEL_FILE) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextlib.contextmanager
def _locked(path: Path):
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)   # released when the file is closed, or when the process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quantized_model(model, model_dir: str | Path, cache_dir: str | Path) -> Path:
    """The int8 ONNX file of `model` (a SentenceTransformer loaded from `model_dir`): from `cache_dir` when a complete
    entry is there, else exported now (about 20 s for all-MiniLM-L6-v2 on 2 cores) and cached."""
    why = unsupported(model)
    if why is not None:
        raise OnnxModelError(f"cannot run {model_dir} as int8 ONNX: {why}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise OnnxModelError(f"{model_dir} is not a local model directory (the int8 export reads the local files)")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{_slug(model_dir)}-{cache_key(_transformer_dir(model_dir))}"
    if _complete(entry):
        return entry / MODEL_FILE
    with _locked(cache_dir / f".{entry.name}.lock"):
        if _complete(entry):   # another process built it while this one waited
            return entry / MODEL_FILE
        if entry.exists():
            broken = cache_dir / f".broken-{entry.name}-{os.getpid()}-{time.monotonic_ns()}"
            log.warning("int8 ONNX cache entry %s is incomplete or damaged: rebuilding it", entry)
            os.replace(entry, broken)
            shutil.rmtree(broken, ignore_errors=True)
        for stale in cache_dir.glob(f".{entry.name}.*.tmp"):   # builds that died half way (this one holds the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=cache_dir))
        try:
            started = time.monotonic()
            with _quiet_export():
                fused = _export(model, tmp)
            (tmp / META_FILE).write_text(json.dumps({
                "sha256": _digest(tmp / MODEL_FILE), "recipe": RECIPE, "source": str(model_dir), "fused": fused,
                "seconds": round(time.monotonic() - started, 1), "versions": _versions(), "time": time.time()}))
            for name in (MODEL_FILE, META_FILE):
                with (tmp / name).open("rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            os.replace(tmp, entry)
            fsync_dir(cache_dir)
            log.info("int8 ONNX model of %s exported to %s in %.1fs (fused: %s)", model_dir, entry,
                     time.monotonic() - started, fused)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / MODEL_FILE


def _versions() -> dict[str, str]:
    import onnxruntime  # deferred: heavy optional imports, only for the cpu profiles
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def _last_hidden_state(transformer):
    """The transformer's forward as (input_ids, attention_mask) -> last_hidden_state, a module for the exporter."""
    import torch  # deferred: a heavy import, only when exporting

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHiddenState(transformer)


class _QuietExport(logging.Filter):
    """onnxruntime's optimizer and quantizer log a line per tensor (some on the root logger) and advise a
    pre-processing step meant for static quantisation: kept out of the agent's log while the export runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        inside = f"{os.sep}onnxruntime{os.sep}" in (record.pathname or "")
        return not inside or (record.levelno >= logging.WARNING
                              and "pre-processing before quantization" not in record.getMessage())


@contextlib.contextmanager
def _quiet_export():
    quiet, root = _QuietExport(), logging.getLogger()
    targets = [root, *root.handlers]
    for t in targets:
        t.addFilter(quiet)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(quiet)


def _export(model, out: Path) -> dict[str, int]:
    """fp32 export -> fused graph -> int8 `out/model.onnx`; the fused operators' counts."""
    import onnx  # deferred: heavy optional imports, only when exporting
    import torch  # deferred
    from onnxruntime.quantization import QuantType, quantize_dynamic  # deferred
    from onnxruntime.transformers import optimizer  # deferred

    transformer = copy.deepcopy(model[0].auto_model).to("cpu").eval()
    transformer.set_attn_implementation("eager")   # the attention pattern onnxruntime fuses
    config = transformer.config
    example = model.tokenizer(["An example sentence to trace the graph with.", "A short one."], padding=True,
                              return_tensors="pt")
    fp32, fused_path = out / "fp32.onnx", out / "fused.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_last_hidden_state(transformer), (example["input_ids"], example["attention_mask"]), str(fp32),
                          dynamo=False, opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], do_constant_folding=True,
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"},
                                        "last_hidden_state": {0: "batch", 1: "sequence"}})
    del transformer
    fused = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size)
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused.save_model_to_file(str(fused_path))
    fp32.unlink()
    quantize_dynamic(str(fused_path), str(out / MODEL_FILE), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    fused_path.unlink()
    return stats


class OnnxEncoder:
    """Token windows -> mean-pooled, L2-normalised sentence vectors through an int8 ONNX model (onnxruntime, CPU).

    `threads` is onnxruntime's intra-op thread count (the host's cores); `batch_size` windows go through the model at
    once, longest first, so that a batch holds windows of similar length and little padding.
    """

    def __init__(self, path: str | Path, *, threads: int, pad_id: int = 0):
        import onnxruntime as ort  # deferred: a heavy optional import, only for the cpu profiles

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between operators: on a CPU host the crawl and the extraction share these cores, and
        # spinning threads take cycles from them (and lose their own turn to the agent's other threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:   # onnxruntime raises its own Fail/InvalidGraph types
            raise OnnxModelError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
        self.path = Path(path)
        self.threads = options.intra_op_num_threads
        self.pad_id = pad_id
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, windows: list[list[int]], batch_size: int) -> np.ndarray:
        """(len(windows), dim) float32: each window (token ids with the special tokens) mean-pooled and normalised."""
        out = np.zeros((len(windows), self.dim), dtype=np.float32)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(1, max(len(windows[i]) for i in rows))
            ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, :len(windows[i])] = windows[i]
                mask[r, :len(windows[i])] = 1
            hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            weights = mask.astype(np.float32)
            pooled = np.einsum("bsd,bs->bd", hidden, weights) / np.maximum(weights.sum(1, keepdims=True), 1e-9)
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out
