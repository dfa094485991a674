"""VRAM estimates against real NVML readings: MiniLM and a GGUF model loaded on an NVIDIA GPU under the optimizer.

Runs `meshctl up` with a twin, the VRAM optimizer (real NVML, no simulation), the topic model (which asks for a
lease for all-MiniLM-L6-v2 at its batch size, moves onto the granted GPU and says it has loaded) and the GGUF
model manager; then asks the model manager to generate with a GGUF model (`--gguf PATH`, or a random llama written
here with agents/vram/gguf.py, `--layers`/`--width` sizing it), so it loads under its lease. For each load the
optimizer measures the holder process's growth on the GPU (NVML per-process memory) against the estimate it was
given; the script reads those from `vram.status`, checks NVML itself, and prints them.

Needs: an NVIDIA GPU and driver, torch with CUDA, and llama-cpp-python built with CUDA
(`CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python`) for the GGUF part.
Without a GPU it says so and exits 0 with `RESULT gpu=none`; with a CPU-only llama.cpp it measures MiniLM only.

Last line: RESULT gpu=<name> minilm_estimate_mib=<e> minilm_measured_mib=<m> minilm_error=<(m-e)/e>
          gguf_estimate_mib=<e> gguf_measured_mib=<m> gguf_error=<(m-e)/e>

Usage: .venv/bin/python bench/vram_gpu.py [--gguf PATH] [--layers 16] [--width 2048] [--n-ctx 4096]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose mesh.py would hide the mesh package

from bench._util import run_main
from testing.harness import MeshUp, free_port_block, write_config  # noqa: E402

MIB = 1 << 20


def measured_from_log(log: str, model: str) -> tuple[float, float] | None:
    """(measured MiB, estimated MiB) from the optimizer's 'loaded, measured X MiB ... against Y MiB' line."""
    found = re.findall(rf"{re.escape(model)} loaded, measured ([\d,.]+) MiB .*? against ([\d,.]+) MiB", log)
    if not found:
        return None
    m, e = found[-1]
    return float(m.replace(",", "")), float(e.replace(",", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, help="a GGUF model (default: a random llama written here)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()

    from agents.vram.gpus import detect_gpus

    backend, detail = detect_gpus(None)
    if backend is None:
        print(f"{detail}; nothing measured")
        print("RESULT gpu=none")
        return
    readings = backend.readings()
    gpu = readings[0].name.replace(" ", "_")
    print(f"GPU: {detail}; {readings[0].free / MIB:,.0f} MiB free of {readings[0].total / MIB:,.0f}")
    import torch

    if not torch.cuda.is_available():
        print(f"torch {torch.__version__} has no CUDA: the topic model cannot use the GPU")
    import llama_cpp

    gguf_on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if not gguf_on_gpu:
        print("llama-cpp-python is a CPU build: the GGUF model is not measured "
              "(CMAKE_ARGS=-DGGML_CUDA=on pip install --force-reinstall --no-cache-dir llama-cpp-python)")

    from agents.contracts import Generate, VramStatusRequest
    from agents.vram.gguf import GgufInfo, estimate, write_tiny_llama
    from mesh.control import client

    with tempfile.TemporaryDirectory(prefix="bench-vram-") as tmp:
        tmp = Path(tmp)
        model = args.gguf
        if model is None:
            model = write_tiny_llama(tmp / "bench.gguf", n_layers=args.layers, n_embd=args.width, n_head=16,
                                     n_ff=args.width * 11 // 4, n_ctx=args.n_ctx)
            print(f"wrote a random llama: {args.layers} blocks x {args.width} wide, "
                  f"{model.stat().st_size / MIB:,.0f} MiB")
        info = GgufInfo.read(model)
        print(f"GGUF estimate at n_ctx {args.n_ctx}: {estimate(info, args.n_ctx) / MIB:,.0f} MiB")
        base = free_port_block(40)
        cfg_path = write_config({
            "mesh": {"name": "bench-vram", "base_port": base, "data_dir": str(tmp / "data"), "heartbeat_interval_s": 1.0},
            "hosts": {"local": {"address": "127.0.0.1"}},
            "security": {"curve": "off"},
            "groups": {"core": {"host": "local", "agents": ["twin", "vram"]},
                       "gpu": {"host": "local", "agents": ["topics", "models"]}},
            "agents": {
                "twin": {"kind": "digital_twin"},
                "vram": {"kind": "vram_optimizer", "depends_on": ["twin"],
                         "settings": {"poll_s": 0.5, "headroom_mb": 512, "keep_alive_s": None}},
                "topics": {"kind": "topic_model", "depends_on": ["vram"],
                           "settings": {"source": None, "device": "auto", "poll_s": 0.5}},
                "models": {"kind": "model_manager", "depends_on": ["vram"],
                           "settings": {"models": {"bench": {"path": str(model), "n_ctx": args.n_ctx}}}},
            }}, tmp / "mesh.yaml")
        from mesh.config import load_config

        cfg = load_config(cfg_path)
        up = MeshUp(cfg_path, out=tmp / "up.log")
        try:
            deadline = time.monotonic() + args.timeout

            def status():
                with client(cfg, "vram", timeout=2.0) as c:
                    return c.request(VramStatusRequest())

            minilm = None
            while time.monotonic() < deadline and minilm is None and torch.cuda.is_available():
                time.sleep(1.0)
                try:
                    st = status()
                except Exception:
                    continue
                if "all-MiniLM-L6-v2" in st.estimates:
                    minilm = measured_from_log(_logs(tmp), "all-MiniLM-L6-v2")
            gguf = None
            if gguf_on_gpu:
                with client(cfg, "models", timeout=args.timeout) as c:
                    out = c.request(Generate(model="bench", prompt="hello", max_tokens=16, ignore_eos=True))
                print(f"GGUF generated {out.tokens} tokens on {out.placement} in {out.elapsed_s:.2f}s")
                while time.monotonic() < deadline and gguf is None:
                    time.sleep(1.0)
                    gguf = measured_from_log(_logs(tmp), "bench")
            st = status()
            for g in st.gpus:
                print(f"GPU {g.index} {g.name}: used {g.used / MIB:,.0f} MiB, leased {g.leased / MIB:,.0f} MiB, "
                      f"processes {{{', '.join(f'{p}: {b / MIB:,.0f} MiB' for p, b in g.processes.items())}}}")
        finally:
            up.interrupt()
            up.wait(60)
    fields = [f"gpu={gpu}"]
    for key, got in (("minilm", minilm), ("gguf", gguf)):
        if got is None:
            print(f"{key}: not measured")
            continue
        m, e = got
        print(f"{key}: estimated {e:,.0f} MiB, measured {m:,.0f} MiB, error {(m - e) / e:+.1%}")
        fields += [f"{key}_estimate_mib={e:.0f}", f"{key}_measured_mib={m:.0f}", f"{key}_error={(m - e) / e:.3f}"]
    print("RESULT " + " ".join(fields))


def _logs(tmp: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (tmp / "data" / "logs").glob("*.log"))


if __name__ == "__main__":
    run_main(main)
