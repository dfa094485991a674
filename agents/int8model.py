"""A sentence-transformers model in int8 for the CPU: quantised offline at first use, cached, run by OpenVINO.

Why. On a CPU host torch runs all-MiniLM-L6-v2 in fp32; OpenVINO runs the same transformer with int8 weights and
int8 activations (VNNI where the CPU has it, bf16 between the int8 layers where it has AVX512-BF16 or AMX) several
times faster, with document vectors within a cosine of about 0.997 of fp32 (bench/topics.py measures both, in the same
run). Measured on 2 cores (AMD EPYC, AVX512-VNNI), one batch of 64 windows of 256 tokens: torch fp32 2.7 s,
onnxruntime with dynamic int8 quantisation 0.80 s, OpenVINO fp32 1.2 s, this model 0.46 s.

Export (`quantized_model`), once per model and cache directory, from the local model only (nothing is downloaded):

  1. the model's transformer (a copy, switched to eager attention) -> an OpenVINO model, by `openvino.convert_model`
     from torch; batch and sequence dimensions dynamic; output: the last hidden state;
  2. NNCF's post-training quantisation (`nncf.quantize`, the transformer preset: SmoothQuant, int8 weights per
     channel, activations calibrated) on `CALIBRATION_WINDOWS` token windows of the docstrings of Python's own
     standard library (`calibration_texts`): real English prose present on every host, the same for every run of one
     Python version. Measured against calibrating on python3-doc pages themselves: the same cosine to fp32 within
     0.001, on python3-doc and on Debian's README files alike.

Mean pooling over the attention mask happens here, in numpy, so only models whose pipeline is a transformer and mean
pooling (and optionally Normalize) are exported (`unsupported` says why not).

Cache: ``<cache_dir>/<model>-<key>/model.xml`` and ``model.bin`` with ``meta.json`` (the files' sha256, the recipe,
versions). The key hashes the recipe, the Python, OpenVINO and NNCF versions and the source model's config and
weights, so another model or version gets its own entry. An entry is built in a temporary directory beside it and
renamed into place complete (a reader sees a whole entry or none); a file lock keeps two processes from building it
twice (the second waits, then uses it); an entry whose files do not match their recorded sha256 (a crash mid-copy, a
truncated or edited file) is moved away and rebuilt.

The export runs in a Python process of its own (`main`), so that its memory (torch's copy of the model, NNCF's
statistics) is given back when it ends and its progress bars stay out of the agent's log, and for usage data: NNCF and
OpenVINO's model converter report usage to Google Analytics whenever the `openvino_telemetry` package imports (they do
not ask first, and write a client id under the home directory); the child blocks that import before anything loads
(`import openvino` alone pulls it in), so nothing leaves the host.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from store.files import fsync_dir

RECIPE = "openvino-convert-eager+nncf-transformer-int8(stdlib-docstrings)/1"
MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
META_FILE = "meta.json"
EXPORT_FILE = "export.json"    # the child process's answer (removed before the entry is kept)
EXPORT_TIMEOUT_S = 1800
CALIBRATION_WINDOWS = 300
# modules whose docstrings calibrate the quantisation: prose on many subjects, all of them in every CPython
CALIBRATION_MODULES = (
    "argparse", "asyncio", "bisect", "calendar", "codecs", "collections", "csv", "dataclasses", "datetime", "decimal",
    "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os",
    "pathlib", "random", "re", "shutil", "socket", "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "xml.etree.ElementTree", "zipfile")
log = logging.getLogger(__name__)


class Int8ModelError(Exception):
    """The model cannot be quantised to, or loaded as, an int8 OpenVINO model."""


def default_cache_dir() -> Path:
    """Where int8 models are kept: MESH_MODEL_CACHE, else $XDG_CACHE_HOME/agent-mesh/models (~/.cache/...). One
    cache per machine and user, not per mesh: every data_dir (a test's, a second mesh's) reuses one model, and the
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
    """16 hex digits over the recipe, the Python, OpenVINO and NNCF versions (the calibration texts are Python's) and
    the model's config and weight files."""
    versions = "\0".join(f"{k}={v}" for k, v in sorted(_versions(with_torch=False).items()))
    h = hashlib.sha256(f"{RECIPE}\0{versions}\0".encode())
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    if not any(p.suffix in (".safetensors", ".bin") for p in files):
        raise Int8ModelError(f"no weights (*.safetensors, *.bin) in {model_dir}")
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
    """The entry's model files are there and have the sha256 its meta.json records."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        return all(_digest(entry / name) == meta["sha256"][name] for name in (MODEL_FILE, WEIGHTS_FILE))
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
    """The int8 OpenVINO model (its .xml; the .bin beside it) of `model`, a SentenceTransformer loaded from
    `model_dir`: from `cache_dir` when a complete entry is there, else quantised now (about 30 s for all-MiniLM-L6-v2
    on 2 cores) and cached."""
    why = unsupported(model)
    if why is not None:
        raise Int8ModelError(f"cannot run {model_dir} in int8: {why}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise Int8ModelError(f"{model_dir} is not a local model directory (the int8 model is made from the local files)")
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
            log.warning("int8 model cache entry %s is incomplete or damaged: rebuilding it", entry)
            os.replace(entry, broken)
            shutil.rmtree(broken, ignore_errors=True)
        for stale in cache_dir.glob(f".{entry.name}.*.tmp"):   # builds that died half way (this one holds the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=cache_dir))
        try:
            started = time.monotonic()
            windows = _export_in_child(model_dir, tmp)
            (tmp / META_FILE).write_text(json.dumps({
                "sha256": {name: _digest(tmp / name) for name in (MODEL_FILE, WEIGHTS_FILE)}, "recipe": RECIPE,
                "source": str(model_dir), "calibration_windows": windows,
                "seconds": round(time.monotonic() - started, 1), "versions": _versions(), "time": time.time()}))
            for name in (MODEL_FILE, WEIGHTS_FILE, META_FILE):
                with (tmp / name).open("rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            os.replace(tmp, entry)
            fsync_dir(cache_dir)
            log.info("int8 model of %s made in %s in %.1fs (calibrated on %d windows)", model_dir, entry,
                     time.monotonic() - started, windows)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / MODEL_FILE




def _versions(*, with_torch: bool = True) -> dict[str, str]:
    """The versions an int8 model depends on, read from the installed distributions (importing NNCF would start its
    usage reporting, see the module docstring)."""
    out = {"python": sys.version.split()[0], "openvino": metadata.version("openvino"), "nncf": metadata.version("nncf")}
    if with_torch:
        out["torch"] = metadata.version("torch")
    return out


def calibration_texts() -> list[str]:
    """The calibration prose: per module of CALIBRATION_MODULES, its docstring and those of its public classes and
    functions, in name order (a module this Python lacks is left out)."""
    texts = []
    for name in CALIBRATION_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, value in sorted(vars(module).items()):
            if (not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
                    and getattr(value, "__module__", "") == module.__name__):
                parts.append(inspect.getdoc(value) or "")
        texts.append("\n\n".join(p for p in parts if p))
    return [t for t in texts if t.strip()]


def calibration_windows(tokenizer, max_length: int, n: int = CALIBRATION_WINDOWS) -> list[list[int]]:
    """The first `n` token windows (special tokens included, at most `max_length` tokens) of `calibration_texts`,
    each text cut into consecutive windows as the embedder cuts documents."""
    windows: list[list[int]] = []
    for text in calibration_texts():
        enc = tokenizer(text, truncation=True, max_length=max_length, stride=32, return_overflowing_tokens=True,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        windows.extend(enc["input_ids"])
        if len(windows) >= n:
            break
    return windows[:n]


def _last_hidden_state(transformer):
    """The transformer's forward as (input_ids, attention_mask) -> last_hidden_state, a module for the converter."""
    import torch  # deferred: a heavy import, only when exporting

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return LastHiddenState(transformer)


def _export_in_child(model_dir: Path, out: Path) -> int:
    """`_export` of the model in `model_dir` into `out`, run by a Python process of its own (`main` below): NNCF and
    OpenVINO's converter are imported there with their usage reporting blocked before anything else loads (in this
    process `openvino` may be imported already, and it imports the reporting package with it); the calibration's
    memory goes with the process; its progress bars and warnings stay out of the agent's log. The number of
    calibration windows used."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}   # the local model only
    try:
        done = subprocess.run([sys.executable, "-m", __spec__.name if __spec__ else "agents.int8model",
                               str(model_dir), str(out)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=EXPORT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise Int8ModelError(f"making the int8 model of {model_dir} took over {EXPORT_TIMEOUT_S}s") from None
    try:
        return int(json.loads((out / EXPORT_FILE).read_text())["calibration_windows"])
    except (OSError, ValueError, KeyError, TypeError):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-8:]
        raise Int8ModelError(f"making the int8 model of {model_dir} failed (exit {done.returncode}): "
                             + " | ".join(tail)) from None
    finally:
        (out / EXPORT_FILE).unlink(missing_ok=True)


def _export(model, out: Path) -> int:
    """torch -> OpenVINO -> int8 `out/model.xml` (and .bin); the number of calibration windows used."""
    import nncf  # deferred: heavy optional imports, only when quantising (in the child process of main())
    import openvino as ov  # deferred
    import torch  # deferred

    nncf.set_log_level(logging.ERROR)
    transformer = copy.deepcopy(model[0].auto_model).to("cpu").eval()
    transformer.set_attn_implementation("eager")   # a plain graph of MatMul and Softmax, which NNCF quantises
    example = model.tokenizer(["An example sentence to trace the graph with.", "A short one."], padding=True,
                              return_tensors="pt")
    with torch.no_grad():
        fp32 = ov.convert_model(_last_hidden_state(transformer),
                                example_input=(example["input_ids"], example["attention_mask"]))
    del transformer
    windows = calibration_windows(model.tokenizer, int(model.max_seq_length))
    if not windows:
        raise Int8ModelError("no calibration text (the docstrings of Python's standard library) was found")

    def feed(ids: list[int]) -> list[np.ndarray]:   # the model's inputs by position: input_ids, attention_mask
        row = np.asarray([ids], dtype=np.int64)
        return [row, np.ones_like(row)]

    int8 = nncf.quantize(fp32, nncf.Dataset(windows, feed), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(windows))
    ov.save_model(int8, str(out / MODEL_FILE))   # model.bin beside it (weights compressed as stored: int8)
    return len(windows)


class Int8Encoder:
    """Token windows -> mean-pooled, L2-normalised sentence vectors through the int8 model (OpenVINO, CPU).

    `threads` is OpenVINO's inference thread count (the host's cores); `batch_size` windows go through the model at
    once, longest first, so that a batch holds windows of similar length and little padding.
    """

    def __init__(self, path: str | Path, *, threads: int, pad_id: int = 0):
        import openvino as ov  # deferred: a heavy optional import, only for the cpu profiles

        self.threads = max(1, threads)
        try:
            core = ov.Core()
            compiled = core.compile_model(str(path), "CPU", {
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",        # one request at a time, all threads on it
                # not pinned to cores: on a CPU host the crawl and the extraction share them
                "ENABLE_CPU_PINNING": False,
            })
        except Exception as exc:   # OpenVINO raises RuntimeError and its own types
            raise Int8ModelError(f"cannot load {path}: {type(exc).__name__}: {exc}") from exc
        self.path = Path(path)
        self.request = compiled.create_infer_request()
        self.pad_id = pad_id
        self.dim = int(compiled.outputs[0].get_partial_shape()[-1].get_length())

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
            hidden = self.request.infer([ids, mask])[0]
            weights = mask.astype(np.float32)
            pooled = np.einsum("bsd,bs->bd", hidden, weights) / np.maximum(weights.sum(1, keepdims=True), 1e-9)
            out[rows] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def main(argv: list[str]) -> int:
    """``python -m agents.int8model MODEL_DIR OUT``: the int8 model of MODEL_DIR into OUT (model.xml, model.bin and
    export.json); what `quantized_model` runs as its child process."""
    sys.modules["openvino_telemetry"] = None   # before NNCF or OpenVINO loads: `import openvino_telemetry` fails
    warnings.simplefilter("ignore")            # the tracer's and transformers' warnings about a traced graph
    from sentence_transformers import SentenceTransformer  # deferred: a heavy import, only in this child

    model_dir, out = Path(argv[0]), Path(argv[1])
    windows = _export(SentenceTransformer(str(model_dir), device="cpu"), out)
    (out / EXPORT_FILE).write_text(json.dumps({"calibration_windows": windows}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
