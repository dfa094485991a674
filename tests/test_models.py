"""GGUF models: headers and estimates of a model the test writes (the `gguf` package), and the model manager
in a real mesh: a twin, the VRAM optimizer on a simulated GPU, and llama.cpp generating over request/reply
under a lease; partial offload when the whole model does not fit, priority revocation, keep-alive, unload."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from agents.contracts import Embed, Generate, Generated, ModelsRequest, Unload, VramStatusRequest
from agents.vram.gguf import (
    GgufError,
    GgufInfo,
    LlamaModel,
    MiB,
    estimate,
    kv_cache_bytes,
    layers_that_fit,
    write_tiny_llama,
)
from agents.vram.models import vectors
from mesh.control import client
from network.messages import Ack
from network.rpc import MeshError
from testing.harness import ROOT, mesh_dict, wait_for

OPTIMIZER = "agents.vram.agent:VramOptimizer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-block random llama (64 wide) whose full offload at n_ctx 4096 needs about 36.7 MiB."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", n_layers=4, n_ctx=4096)


def test_header_and_estimates(tiny):
    info = GgufInfo.read(tiny)
    assert (info.architecture, info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == ("llama", 4, 64, 4, 4)
    assert info.n_vocab == 3 + 256 + 1 + 26 + 49      # specials, bytes, "▁", letters, words
    # every block: 2 norms of 64 + 4 attention matrices 64x64 + 3 feed-forward 128x64, float32
    assert info.block_bytes == [4 * (2 * 64 + 4 * 64 * 64 + 3 * 128 * 64)] * 4
    assert info.token_embd_bytes == 4 * info.n_vocab * 64
    assert info.output_bytes == 4 * (info.n_vocab * 64 + 64)
    assert sum(info.block_bytes) + info.output_bytes + info.token_embd_bytes < info.file_bytes
    assert kv_cache_bytes(info, 4096, 1) == 2 * 4096 * 64 * 2
    full = estimate(info, 4096)
    assert estimate(info, 4096, 0) == 0 < estimate(info, 4096, 1) < estimate(info, 4096, 3) < full
    assert estimate(info, 4096, 4) == full == estimate(info, 4096, 99)
    assert layers_that_fit(info, full, 4096) == -1
    assert layers_that_fit(info, full - 1, 4096) == 3
    assert layers_that_fit(info, estimate(info, 4096, 2), 4096) == 2
    assert layers_that_fit(info, MiB, 4096) == 0


def test_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    for path in (bad, tmp_path / "missing.gguf"):
        with pytest.raises(GgufError, match=str(path.name)):
            GgufInfo.read(path)
    with pytest.raises(GgufError, match="cannot load"):
        LlamaModel(bad)


def test_llama_generates_and_embeds(tiny):
    model = LlamaModel(tiny, n_ctx=256)
    try:
        a = model.generate("hello world", max_tokens=8, temperature=0.8, seed=7, ignore_eos=True)
        b = model.generate("hello world", max_tokens=8, temperature=0.8, seed=7, ignore_eos=True)
        assert a == b and a[1] >= 8 and a[2] == "length"
        with pytest.raises(GgufError, match="embedding"):
            model.embed(["x"])
    finally:
        model.close()
    emb = LlamaModel(tiny, n_ctx=256, embedding=True)
    try:
        v = emb.embed(["python data", "hello world", "python data"])
        assert v.shape == (3, 64)
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
        assert np.allclose(v[0], v[2]) and not np.allclose(v[0], v[1])
    finally:
        emb.close()


def models_config(model_path, *, total_mb: int | None = 1000, headroom_mb: int = 0, keep_alive_s=None,
                  extra: dict | None = None, **models) -> dict:
    agents = {"models": {"kind": "model_manager", "depends_on": ["twin"],
                         "settings": {"models": models or {"tiny": {"path": str(model_path), "n_ctx": 4096}}}}}
    if total_mb is not None:
        agents["vram"] = {"kind": OPTIMIZER, "depends_on": ["twin"],
                          "settings": {"simulated": {"total_mb": total_mb, "name": "SimulatedGPU test card"},
                                       "headroom_mb": headroom_mb, "poll_s": 0.1, "keep_alive_s": keep_alive_s,
                                       "revoke_grace_s": 5.0}}
    return mesh_dict({**agents, **(extra or {})}, request_timeout_s=5.0)


def ask(cfg, agent, msg, timeout=30.0):
    with client(cfg, agent, timeout=timeout) as c:
        return c.request(msg)


def model_state(cfg, name="tiny"):
    return next(m for m in ask(cfg, "models", ModelsRequest()).models if m.name == name)


def leases(cfg):
    return {(lease.model, lease.state) for lease in ask(cfg, "vram", VramStatusRequest()).leases}


def meshctl(path, *args):
    return subprocess.run([sys.executable, "-m", "ops.meshctl", *args, "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_generate_under_a_lease_then_unload(tiny, write_config, run_agents):
    path, cfg = write_config(models_config(tiny))
    run_agents(cfg, "twin", "vram", "models")
    wait_for(lambda: ask(cfg, "models", ModelsRequest(), timeout=1.0), timeout=20, what="model manager up")
    assert model_state(cfg).state == "unloaded" and not leases(cfg)

    out = ask(cfg, "models", Generate(model="tiny", prompt="hello world", max_tokens=12, temperature=0.8, seed=3,
                                      ignore_eos=True))
    assert isinstance(out, Generated) and out.tokens >= 12 and out.finish == "length" and out.text
    assert out.placement == "cuda:0"            # granted on the simulated card (llama.cpp here is a CPU build)
    st = model_state(cfg)
    assert st.state == "loaded" and st.lease and st.requests == 1
    assert st.estimate_bytes == estimate(GgufInfo.read(tiny), 4096)
    assert leases(cfg) == {("tiny", "granted")}
    again = ask(cfg, "models", Generate(model="tiny", prompt="hello world", max_tokens=12, temperature=0.8, seed=3,
                                        ignore_eos=True))
    assert again.text == out.text               # seeded: the same text from the same loaded model
    r = meshctl(path, "vram")
    assert r.returncode == 0, r.stderr
    assert "SimulatedGPU test card" in r.stdout and "tiny" in r.stdout and "granted" in r.stdout
    r = meshctl(path, "models", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"][0]["state"] == "loaded"

    assert isinstance(ask(cfg, "models", Unload(model="tiny")), Ack)
    wait_for(lambda: not leases(cfg), timeout=10, what="the lease released")
    assert model_state(cfg).state == "unloaded"
    ask(cfg, "models", Generate(model="tiny", prompt="hello", max_tokens=4, ignore_eos=True))   # loads again
    assert model_state(cfg).state == "loaded" and leases(cfg) == {("tiny", "granted")}

    with pytest.raises(MeshError) as exc:
        ask(cfg, "models", Generate(model="nope", prompt="x"))
    assert exc.value.code == "unknown_model" and "tiny" in exc.value.message
    with pytest.raises(MeshError) as exc:
        ask(cfg, "models", Embed(model="tiny", texts=["x"]))
    assert exc.value.code == "bad_request"
    assert model_state(cfg).state == "loaded"   # bad requests changed nothing


def test_partial_offload_when_the_model_does_not_fit(tiny, write_config, run_agents):
    info = GgufInfo.read(tiny)
    assert estimate(info, 4096, 2) < 35 * MiB < estimate(info, 4096, 3)
    _, cfg = write_config(models_config(tiny, total_mb=36, headroom_mb=1))      # a 35 MiB budget
    run_agents(cfg, "twin", "vram", "models")
    out = ask(cfg, "models", Generate(model="tiny", prompt="hello", max_tokens=4, ignore_eos=True))
    assert out.placement == "cuda:0 (2/4 layers)"
    st = model_state(cfg)
    assert (st.n_gpu_layers, st.estimate_bytes) == (2, estimate(info, 4096, 2))


def test_no_block_fits_runs_on_the_cpu(tiny, write_config, run_agents):
    _, cfg = write_config(models_config(tiny, total_mb=20))
    run_agents(cfg, "twin", "vram", "models")
    out = ask(cfg, "models", Generate(model="tiny", prompt="hello", max_tokens=4, ignore_eos=True))
    assert out.placement == "cpu" and out.tokens >= 4
    assert model_state(cfg).lease is None and not leases(cfg)


def test_priority_revokes_the_lower_model_and_keep_alive_unloads(tiny, write_config, run_agents):
    both = {"low": {"path": str(tiny), "n_ctx": 4096, "priority": 0},
            "high": {"path": str(tiny), "n_ctx": 4096, "priority": 5}}
    _, cfg = write_config(models_config(tiny, total_mb=50, keep_alive_s=2.0, **both))   # room for one of them
    run_agents(cfg, "twin", "vram", "models")
    ask(cfg, "models", Generate(model="low", prompt="hello", max_tokens=4, ignore_eos=True))
    assert leases(cfg) == {("low", "granted")}
    out = ask(cfg, "models", Generate(model="high", prompt="hello", max_tokens=4, ignore_eos=True))
    assert out.placement == "cuda:0"
    assert leases(cfg) == {("high", "granted")}
    assert model_state(cfg, "low").state == "unloaded"
    # nobody uses "high" now: after the optimizer's keep-alive it is asked to unload, and does
    wait_for(lambda: model_state(cfg, "high").state == "unloaded", timeout=15, what="keep-alive unload")
    wait_for(lambda: not leases(cfg), timeout=5, what="lease released")


def test_without_an_optimizer_and_embeddings(tiny, write_config, run_agents):
    _, cfg = write_config(models_config(tiny, total_mb=None, tiny={"path": str(tiny), "n_ctx": 256},
                                        emb={"path": str(tiny), "n_ctx": 256, "embedding": True},
                                        missing={"path": "nowhere.gguf"}))
    run_agents(cfg, "twin", "models")
    out = ask(cfg, "models", Generate(model="tiny", prompt="hello", max_tokens=4, ignore_eos=True))
    assert out.placement == "cpu"   # no optimizer, and a llama.cpp without GPU offload
    reply = ask(cfg, "models", Embed(model="emb", texts=["python data", "hello world"]))
    v = vectors(reply)
    assert v.shape == (2, 64) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    with pytest.raises(MeshError) as exc:
        ask(cfg, "models", Generate(model="missing", prompt="x"))
    assert exc.value.code == "unavailable" and "nowhere.gguf" in exc.value.message
    st = model_state(cfg, "missing")
    assert st.state == "failed" and "no such file" in st.error
    assert model_state(cfg, "tiny").state == "loaded"


SUBJECTS = {
    "cooking": "Knead the bread dough for ten minutes, let it rise, then bake the loaf in a hot oven until golden. "
               "Season the soup with salt, simmer the vegetables and stir in fresh herbs before serving dinner.",
    "astronomy": "The telescope observed distant galaxies and the orbit of the planet around its star. Astronomers "
                 "measured the redshift of the nebula and the brightness of the comet in the night sky.",
    "sailing": "Trim the mainsail, ease the jib sheet and tack the boat into the wind. The sailors reefed the sails "
               "when the gale rose, and the yacht reached the harbour before the storm.",
}


def test_readable_topic_titles_from_a_gguf_model(tiny, write_config, run_agents):
    """The topic agent's label_model: titles from the model manager's GGUF model (here a random one, so the titles
    are noise, but they are its output, per topic, and come back in topics.list)."""
    from agents.contracts import TopicsRequest
    from store.docstore import Document, open_docstore

    topics = {"kind": "topic_model", "depends_on": ["twin"],
              "settings": {"source": None, "poll_s": 0.2, "max_chunks": 1, "label_model": "tiny", "label_every_s": 0.5}}
    _, cfg = write_config(models_config(tiny, total_mb=None, extra={"topics": topics},
                                        tiny={"path": str(tiny), "n_ctx": 256}))
    store = open_docstore(cfg.store_url("documents"))
    for i, (subject, text) in enumerate(SUBJECTS.items()):
        for j in range(2):
            url = f"http://site.test/{subject}/{j}"
            store.upsert(Document(url=url, final_url=url, content_hash=f"{i}{j}".ljust(64, "0"), fetched_at=1.0,
                                  http_status=200, content_type="text/html", state="extracted",
                                  text=text if j == 0 else text.replace(". ", f". Page {j}. ")))
    store.close()
    run_agents(cfg, "twin", "models", "topics")

    def titled():
        reply = ask(cfg, "topics", TopicsRequest(), timeout=2.0)
        return reply if reply.topics and all(t.title for t in reply.topics) else None

    reply = wait_for(titled, timeout=90, interval=0.5, what="every topic titled")
    assert len(reply.topics) >= 2
    assert model_state(cfg).requests >= len(reply.topics)
