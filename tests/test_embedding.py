"""Hardware profiles and the int8 OpenVINO backend of the embedder (agents/embedding.py, agents/int8model.py).

Profiles: which one a host runs, from its config (hosts.HOST.profile) and the topic agent's explicit settings, on a
host with and without CUDA. The int8 model: exported offline at first use into a temporary data dir, reused the second
time, rebuilt when its cache file is damaged or cut short, built once when two callers ask at the same moment; its
document vectors against torch fp32 on real texts; and the topic agent on the small profile says so in its listing,
its status line and its heartbeat figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the model is packaged, no network

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from testing.system import need_modules

need_modules("openvino", "sentence_transformers")   # before the imports below (not nncf: importing it starts its usage reporting)

from agents.contracts import TopicsRequest
from agents.embedding import CPU_BATCH_SIZE, SMALL_MAX_CHUNKS, Embedder, EmbedderError, resolve_profile
from agents.extractor.backends import extract
from agents.int8model import META_FILE, MODEL_FILE, WEIGHTS_FILE, _complete, calibration_windows, quantized_model
from agents.topics.agent import TopicSettings, host_profile
from mesh.config import ConfigError, parse_config
from mesh.control import client
from mesh.messages import StatusRequest
from network.messages import Ping
from testing.harness import mesh_dict, wait_for

PYDOC = Path("/usr/share/doc/python3/html")


# --- profiles -------------------------------------------------------------------------------------------------------


def config(profile: str | None = None, **settings) -> object:
    host = {"address": "127.0.0.1", **({"profile": profile} if profile is not None else {})}
    return parse_config(mesh_dict({"topics": {"kind": "topic_model", "settings": {"source": None, **settings}}},
                                  hosts={"box": host}))


def profile_of(cfg, *, cuda: bool, cores: int = 8):
    return host_profile(cfg, "topics", cfg.settings_of("topics", TopicSettings), cuda=cuda, cores=cores)


def test_default_profile_is_gpu_with_cuda_else_cpu():
    cfg = config()
    assert cfg.hosts["box"].profile == "auto"
    gpu = profile_of(cfg, cuda=True)
    assert (gpu.name, gpu.backend, gpu.device, gpu.batch_size, gpu.max_chunks) == ("gpu", "torch", "auto", 32, 16)
    cpu = profile_of(cfg, cuda=False, cores=6)
    assert (cpu.name, cpu.backend, cpu.device, cpu.threads) == ("cpu", "openvino-int8", "cpu", 6)
    assert (cpu.batch_size, cpu.max_chunks, cpu.note) == (CPU_BATCH_SIZE, 16, "")
    assert profile_of(config(device="cpu"), cuda=True).name == "cpu"    # auto on a GPU host told to use the CPU


def test_explicit_profiles_and_settings_win():
    for cuda in (True, False):
        assert profile_of(config("cpu"), cuda=cuda).backend == "openvino-int8"
        small = profile_of(config("small"), cuda=cuda, cores=2)
        assert (small.name, small.backend, small.max_chunks, small.threads) == (
            "small", "openvino-int8", SMALL_MAX_CHUNKS, 2)
    assert profile_of(config("gpu"), cuda=True).backend == "torch"
    tuned = profile_of(config("small", batch_size=8, max_chunks=6, threads=3), cuda=False)
    assert (tuned.batch_size, tuned.max_chunks, tuned.threads) == (8, 6, 3)
    assert "profile small: int8 OpenVINO, 3 thread(s), batch 8, at most 6 chunks per document" == tuned.describe()


def test_gpu_profile_without_cuda():
    fallback = profile_of(config("gpu"), cuda=False)         # device auto: the cpu profile, and why
    assert (fallback.name, fallback.asked, fallback.backend) == ("cpu", "gpu", "openvino-int8")
    assert "CUDA is not available" in fallback.note and fallback.note in fallback.describe()
    torch_cpu = profile_of(config("gpu", device="cpu"), cuda=False)   # torch fp32 on the CPU, as asked
    assert (torch_cpu.name, torch_cpu.backend, torch_cpu.device, torch_cpu.note) == ("gpu", "torch", "cpu", "")
    asked_cuda = profile_of(config("gpu", device="cuda"), cuda=False)  # the Embedder refuses it, as before profiles
    assert (asked_cuda.backend, asked_cuda.device) == ("torch", "cuda")


def test_profile_config_errors():
    with pytest.raises(ConfigError) as info:
        config("tiny")
    assert "hosts.box.profile" in str(info.value)
    cfg = config("cpu", device="cuda")
    with pytest.raises(ConfigError) as info:
        cfg.settings_of("topics", TopicSettings)
    assert "agents.topics.settings" in str(info.value) and "hosts.box.profile to gpu" in str(info.value)
    with pytest.raises(EmbedderError, match="with the small profile"):
        resolve_profile("small", device="cuda:0", cuda=True)
    with pytest.raises(EmbedderError, match="unknown hardware profile"):
        resolve_profile("fast", cuda=False)


# --- the int8 model -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(device="cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory, torch_embedder: Embedder) -> Path:
    """A cache dir holding the int8 model, made once for the module (two callers at the same moment)."""
    cache = tmp_path_factory.mktemp("data") / "models"
    (cache.parent / "home").mkdir()
    paths: list[Path] = []
    callers = [threading.Thread(target=lambda: paths.append(quantized_model(torch_embedder.model,
                                                                            torch_embedder.model_name, cache)))
               for _ in range(2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(cache.parent / "home"))             # where OpenVINO's usage reporting keeps its id
        for t in callers:
            t.start()
        for t in callers:
            t.join(300)
    assert len(paths) == 2 and paths[0] == paths[1]
    return cache


def test_export_is_made_offline_once_and_reused(models: Path, torch_embedder: Embedder):
    entries = [p for p in models.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1                                      # two callers, one model made
    assert not [p for p in models.iterdir() if p.name.endswith(".tmp")]
    entry = entries[0]
    meta = json.loads((entry / META_FILE).read_text())
    assert meta["calibration_windows"] >= 200
    assert set(meta["sha256"]) == {MODEL_FILE, WEIGHTS_FILE}
    assert (entry / WEIGHTS_FILE).stat().st_size < 40e6           # int8 weights (fp32 MiniLM is 90 MB)
    assert list((models.parent / "home").iterdir()) == []        # no usage reporting: nothing written in $HOME
    built = (entry / MODEL_FILE).stat()
    again = quantized_model(torch_embedder.model, torch_embedder.model_name, models)   # the second time: reused
    assert again == entry / MODEL_FILE
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    assert json.loads((entry / META_FILE).read_text())["time"] == meta["time"]


def test_calibration_is_real_prose_the_same_every_time(torch_embedder: Embedder):
    windows = calibration_windows(torch_embedder.tokenizer, 256)
    assert len(windows) >= 200 and windows == calibration_windows(torch_embedder.tokenizer, 256)
    assert all(len(w) <= 256 for w in windows) and sum(len(w) for w in windows) / len(windows) > 128
    words = torch_embedder.tokenizer.decode(windows[0], skip_special_tokens=True).split()
    assert len(words) > 50


def test_an_edited_file_makes_an_entry_incomplete(tmp_path: Path, models: Path):
    entry = tmp_path / "entry"
    shutil.copytree(next(p for p in models.iterdir() if not p.name.startswith(".")), entry)
    assert _complete(entry)
    with (entry / MODEL_FILE).open("a") as f:
        f.write("<!-- edited -->")                                # either file: the graph here, the weights below
    assert not _complete(entry)


@pytest.mark.slow   # makes the int8 model again (about 25 s); the fast test above checks the damage is seen
def test_damaged_cache_is_rebuilt(tmp_path: Path, models: Path, torch_embedder: Embedder):
    cache = tmp_path / "models"
    shutil.copytree(models, cache)
    entry = next(p for p in cache.iterdir() if not p.name.startswith("."))
    model = entry / WEIGHTS_FILE
    size = model.stat().st_size
    with model.open("r+b") as f:
        f.truncate(size // 2)                                     # a copy cut short
    (cache / f".{entry.name}.abc.tmp").mkdir()                    # and a build that died half way
    (cache / f".{entry.name}.abc.tmp" / MODEL_FILE).write_bytes(b"\0" * 100)
    path = quantized_model(torch_embedder.model, torch_embedder.model_name, cache)
    assert path == entry / MODEL_FILE and model.stat().st_size > size * 0.9
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]   # the dead build's leftovers are gone
    emb = Embedder(device="cpu", backend="openvino-int8", cache_dir=cache, max_chunks=4)   # and it loads
    assert emb.embed(["A sentence."]).vectors.shape == (1, emb.dim)


def real_texts() -> list[str]:
    """Real prose: python3-doc pages when installed, else the docstrings of a few standard modules."""
    if (PYDOC / "index.html").exists():
        pages = ["library/json.html", "tutorial/classes.html", "howto/logging.html", "library/asyncio-task.html"]
        return [extract((PYDOC / p).read_bytes(), url=f"http://docs.local/{p}", content_type="text/html").text
                for p in pages]
    import argparse
    import collections
    import json as json_module
    import subprocess

    return [m.__doc__ for m in (argparse, collections, json_module, subprocess)]


def test_int8_vectors_are_close_to_torch_fp32(models: Path, torch_embedder: Embedder):
    fast = Embedder(device="cpu", backend="openvino-int8", cache_dir=models, threads=2)
    texts = real_texts() + ["Short text."]
    a, b = fast.embed(texts + [""]), torch_embedder.embed(texts)
    assert a.chunks[:-1] == b.chunks and a.chunks_total[:-1] == b.chunks_total and a.tokens == b.tokens
    assert max(a.chunks) > 1                                      # long documents, several chunks pooled
    cosine = np.einsum("ij,ij->i", a.semantic[:-1], b.semantic)
    assert cosine.min() >= 0.98, cosine
    assert np.allclose(np.linalg.norm(a.vectors, axis=1), 1.0, atol=1e-5)   # the empty text's too
    assert fast.backend_label == "cpu (int8 OpenVINO, 2 thread(s))"
    fast.set_device("cpu")
    with pytest.raises(EmbedderError):            # no CUDA here, or (on a GPU host) not for the int8 backend
        fast.set_device("cuda")


# --- the agent says its profile -------------------------------------------------------------------------------------


def test_topic_agent_shows_its_profile(models: Path, write_config, run_agents, tmp_path: Path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("MESH_MODEL_CACHE", str(models))          # the int8 model is reused from the cache: no new one
    made = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    path, cfg = write_config(mesh_dict({"topics": {"kind": "topic_model", "depends_on": ["twin"],
                                                   "settings": {"source": None, "poll_s": 0.2}}},
                                       hosts={"local": {"address": "127.0.0.1", "profile": "small"}},
                                       data_dir=str(data)))
    run_agents(cfg, "twin", "topics")
    with client(cfg, "topics", timeout=2.0) as c:
        wait_for(lambda: c.request(Ping()).state == "ready", timeout=120, interval=0.3, what="the topic model ready")
        listing = c.request(TopicsRequest(limit=5))
    assert listing.profile.startswith("profile small: int8 OpenVINO")
    assert f"at most {SMALL_MAX_CHUNKS} chunks" in listing.profile
    assert listing.device == "cpu"
    with client(cfg, "twin", timeout=2.0) as twin:
        row = wait_for(lambda: next(a for a in twin.request(StatusRequest()).agents
                                    if a.agent == "topics" and a.stats.gauges.get("profile:small") == 1.0),
                       timeout=10, what="the profile in the topic model's heartbeat")
    assert row.detail == listing.profile
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == made
