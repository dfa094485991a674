"""GGUF models: what a file holds, how much GPU memory it needs, and llama.cpp loading.

`GgufInfo.read(path)` reads a GGUF file's header and tensor table with the `gguf` package (no weights are loaded):
architecture, layer count, context length, embedding and attention sizes, and the bytes of every tensor, split into
the repeating blocks (`blk.N.*`) and the rest (token embeddings, output head, norms).

`estimate(info, n_ctx, n_gpu_layers)` is the GPU memory llama.cpp needs with `n_gpu_layers` of the blocks offloaded:

    offloaded blocks' weights                        (exact, from the tensor table)
  + the output head and final norm when every block is offloaded (llama.cpp puts them on the GPU then)
  + the KV cache of the offloaded layers:  2 (K and V) * n_ctx * n_embd_kv * 2 bytes (f16) per layer
  + the compute buffer: n_ctx * (n_embd + n_vocab) * 4 bytes, at least 32 MiB (llama.cpp reserves one for the
    largest graph it will run; this is its order of magnitude, and the VRAM optimizer corrects it by the measured
    NVML delta after the load)

The token embedding table stays on the CPU (llama.cpp reads rows of it; it never offloads it). `layers_that_fit`
is the largest `n_gpu_layers` whose estimate fits in a number of free bytes: partial offload for a model bigger
than the lease it can get.

`LlamaModel` loads a file with llama-cpp-python (`llama_cpp.Llama`) and generates or embeds; it is the model
manager's (agents/vram/models.py) unit of work. llama_cpp is imported on first load, so a host that never
loads a GGUF model does not need it working.

`write_tiny_llama(path)` writes a small random llama (2 blocks, 64-wide, a byte-fallback SentencePiece vocabulary
of its own): a real GGUF file that llama.cpp loads and generates from (meaningless text), for tests and for
checking a machine's llama.cpp build and GPU offload without downloading a model.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType

MiB = 1 << 20
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GgufError(Exception):
    """Not a GGUF file, or one this code cannot size (the message says which and why)."""


@dataclass
class GgufInfo:
    path: str
    file_bytes: int
    architecture: str
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    block_bytes: list[int]            # weights of each repeating block, blk.0 first
    output_bytes: int                 # output head + final norm (GPU when every block is offloaded)
    token_embd_bytes: int             # stays on the CPU
    name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embd_kv(self) -> int:
        return self.n_embd * self.n_head_kv // max(1, self.n_head)

    @classmethod
    def read(cls, path: str | os.PathLike) -> GgufInfo:
        path = Path(path)
        try:
            reader = GGUFReader(path)
        except FileNotFoundError:
            raise GgufError(f"{path}: no such file") from None
        except Exception as exc:   # the reader raises ValueError, struct errors, ... on a file that is not GGUF
            raise GgufError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        meta = {name: _value(f) for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
        arch = str(meta.get("general.architecture", ""))
        if not arch:
            raise GgufError(f"{path}: no general.architecture in the GGUF header")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise GgufError(f"{path}: the GGUF header has no {arch}.{name}")
            return value

        n_layers = int(key("block_count"))
        blocks = [0] * n_layers
        output = token_embd = 0
        for t in reader.tensors:
            nbytes = int(t.n_bytes)
            m = _BLOCK.match(t.name)
            if m and int(m.group(1)) < n_layers:
                blocks[int(m.group(1))] += nbytes
            elif t.name.startswith("token_embd"):
                token_embd += nbytes
            else:
                output += nbytes
        if not any(t.name.startswith("output.") for t in reader.tensors):
            output += token_embd    # tied embeddings: the output head reuses token_embd, on the GPU as well
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        n_head = int(key("attention.head_count"))
        head_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
        return cls(path=str(path), file_bytes=path.stat().st_size, architecture=arch, n_layers=n_layers,
                   n_ctx_train=int(key("context_length", 0)), n_embd=int(key("embedding_length")), n_head=n_head,
                   n_head_kv=int(head_kv if not isinstance(head_kv, list) else max(head_kv)),
                   n_vocab=len(tokens.data) if tokens is not None else 0, block_bytes=blocks, output_bytes=output,
                   token_embd_bytes=token_embd, name=str(meta.get("general.name", "")), metadata=meta)


def _value(f) -> Any:
    """A GGUF header field as a Python value (scalars, strings, arrays of scalars)."""
    try:
        if not f.types:
            return None
        if f.types[0] == GGUFValueType.ARRAY:
            if len(f.types) > 1 and f.types[1] == GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        return f.parts[f.data[0]].tolist()[0]
    except (IndexError, ValueError):
        return None


def kv_cache_bytes(info: GgufInfo, n_ctx: int, layers: int) -> int:
    return 2 * n_ctx * info.n_embd_kv * 2 * layers


def compute_bytes(info: GgufInfo, n_ctx: int) -> int:
    return max(32 * MiB, n_ctx * (info.n_embd + info.n_vocab) * 4)


def estimate(info: GgufInfo, n_ctx: int, n_gpu_layers: int = -1) -> int:
    """GPU bytes llama.cpp needs for `info` with `n_gpu_layers` blocks offloaded (-1: all; 0: none, CPU only)."""
    layers = info.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, info.n_layers)
    if layers == 0:
        return 0
    total = sum(info.block_bytes[:layers]) + kv_cache_bytes(info, n_ctx, layers) + compute_bytes(info, n_ctx)
    if layers == info.n_layers:
        total += info.output_bytes
    return total


def layers_that_fit(info: GgufInfo, free_bytes: int, n_ctx: int) -> int:
    """The most blocks that fit in `free_bytes` (-1: all of them, output head included; 0: none)."""
    if estimate(info, n_ctx, -1) <= free_bytes:
        return -1
    best = 0
    for layers in range(1, info.n_layers):
        if estimate(info, n_ctx, layers) > free_bytes:
            break
        best = layers
    return best


# --- loading with llama.cpp ------------------------------------------------------------------------------------

class LlamaModel:
    """One GGUF model loaded by llama.cpp. Calls are serialised (a llama context is not thread-safe)."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, n_gpu_layers: int = 0, embedding: bool = False,
                 seed: int = 0, n_threads: int | None = None):
        try:
            from llama_cpp import Llama  # deferred: heavy, and its shared library may fail to load
        except Exception as exc:   # ImportError, or OSError when the shared library cannot load
            raise GgufError(f"llama-cpp-python is not usable here: {type(exc).__name__}: {exc}") from None
        self.path = str(path)
        self.n_gpu_layers = n_gpu_layers
        self.embedding = embedding
        self.lock = threading.Lock()
        started = time.monotonic()
        try:
            self.llama = Llama(model_path=self.path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, embedding=embedding,
                               seed=seed, n_threads=n_threads, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise GgufError(f"llama.cpp cannot load {self.path}: {exc}") from None
        self.load_s = time.monotonic() - started

    def generate(self, prompt: str, *, max_tokens: int = 32, temperature: float = 0.0, top_p: float = 0.95,
                 stop: list[str] | None = None, seed: int | None = None, ignore_eos: bool = False) -> tuple[str, int, str]:
        """(text, tokens generated, finish reason: stop | length). `ignore_eos` generates `max_tokens` whatever the
        model thinks (benchmarks, and the random test model, whose first choice may well be end-of-text)."""
        if self.embedding:
            raise GgufError("this model was loaded for embeddings (embedding: true): it does not generate")
        with self.lock:
            if seed is not None:
                self.llama.set_seed(seed)
            bias = {self.llama.token_eos(): -1e9} if ignore_eos else None
            out = self.llama.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                               stop=stop or None, logit_bias=bias)
        choice = out["choices"][0]
        return choice["text"], int(out["usage"]["completion_tokens"]), choice.get("finish_reason") or "stop"

    def embed(self, texts: list[str]) -> np.ndarray:
        """Pooled, L2-normalised embeddings, one row per text."""
        if not self.embedding:
            raise GgufError("this model was not loaded for embeddings: set embedding: true in its settings")
        with self.lock:
            rows = [self.llama.embed(t, normalize=True) for t in texts]
        out = []
        for r in rows:
            a = np.asarray(r, dtype=np.float32)
            if a.ndim == 2:    # per-token rows when the model has no pooling: mean-pool, normalise again
                a = a.mean(axis=0)
                a = a / max(float(np.linalg.norm(a)), 1e-12)
            out.append(a)
        return np.vstack(out) if out else np.zeros((0, 0), dtype=np.float32)

    def close(self) -> None:
        with self.lock:
            llama, self.llama = getattr(self, "llama", None), None
            if llama is not None:
                llama.close()


# --- a tiny model of our own ------------------------------------------------------------------------------------

_WORDS = ("the of and to in is that for it as with was on be by this are from at or an which not have has can "
          "python data model crawl page topic agent mesh cache memory queue graph node token layer vector text "
          "hello world learn find new know").split()


def write_tiny_llama(path: str | os.PathLike, *, n_layers: int = 2, n_embd: int = 64, n_head: int = 4,
                     n_ff: int = 128, n_ctx: int = 256, seed: int = 0) -> Path:
    """Writes a random llama model with a small SentencePiece vocabulary (byte fallback) to `path`."""
    path = Path(path)
    tokens: list[str] = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581" + w for w in _WORDS]
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    n_vocab = len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    for i in range(n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    writer.add_tensor("output.weight", w(n_vocab, n_embd))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
