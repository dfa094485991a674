"""The twin's health dashboard and alerts: JSON and server-sent events over real HTTP, the token,
alerts on death, flapping and an unreachable host, and the page itself in headless Chromium (agents,
a kill seen live, and how far behind the store a real topic model is)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import zmq

from agents.echo import EchoAgent
from mesh.config import ConfigError
from mesh.control import client, fetch_status
from mesh.messages import Alert, Heartbeat, Register
from mesh.runtime import check_kinds
from network.messages import Echo
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from store.docstore import Document, open_docstore
from testing.harness import ROOT, mesh_dict, wait_for
from testing.system import missing, reason

OUTPUT = Path(os.environ.get("MESH_TEST_OUTPUT", ROOT / "test-output"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-dev-shm-usage"]


def dashboard_url(cfg) -> str:
    return f"http://127.0.0.1:{cfg.mesh.base_port + 80 + cfg.mesh.port_offset}"


def chain(**twin_settings):
    d = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                   "b": {"kind": "echo", "depends_on": ["a"], "required": False}})
    if twin_settings:
        d["agents"]["twin"]["settings"] = twin_settings
    return d


def read_events(url: str, want: int, timeout: float = 10.0, headers: dict | None = None) -> list[tuple[str, dict]]:
    """The first `want` events of the SSE stream at `url`, parsed."""
    events: list[tuple[str, dict]] = []
    with httpx.stream("GET", url, timeout=timeout, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if len(events) >= want:
                    break
    return events


def test_state_history_and_events_over_http(write_config, run_agents):
    _, cfg = write_config(chain(history_every_s=0.3))
    run_agents(cfg, "twin", "a", "b")
    base = dashboard_url(cfg)
    wait_for(lambda: all(a["state"] == "ready" for a in httpx.get(base + "/api/state").json()["agents"]),
             timeout=15, what="every agent ready on /api/state")
    st = httpx.get(base + "/api/state").json()
    assert [a["agent"] for a in st["agents"]] == ["twin", "a", "b"]
    assert st["order"] == [["twin"], ["a"], ["b"]] and st["mesh_state"] == "ready"
    b = next(a for a in st["agents"] if a["agent"] == "b")
    assert b["depends_on"] == ["a"] and b["level"] == 3 and b["group"] == "g-b" and b["host"] == "local"
    assert b["heartbeat_age_s"] < 1.0 and b["uptime_s"] is not None and b["pid"] == os.getpid()
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text   # nothing from a CDN
    for asset in ("/app.js", "/app.css"):
        body = httpx.get(base + asset).text
        assert "https://" not in body and "//cdn" not in body
    wait_for(lambda: len(httpx.get(base + "/api/history").json()) >= 2, timeout=5, what="history points")
    events = read_events(base + "/events", 3)
    assert events[0][0] == "state" and [a["agent"] for a in events[0][1]["agents"]] == ["twin", "a", "b"]
    assert {name for name, _ in events} <= {"state", "history"}
    assert httpx.get(base + "/nope").status_code == 404


def test_messages_rate_and_pipeline_gauges_reach_the_dashboard(write_config, run_agents):
    """Traffic through `a` shows as its msg/s; a heartbeat's gauges show as the agent's figures."""
    _, cfg = write_config(chain())
    run_agents(cfg, "twin", "a")
    base = dashboard_url(cfg)
    wait_for(lambda: fetch_status(cfg).agents[1].state == "ready", timeout=15, what="a ready")
    sent = 0
    with client(cfg, "a") as c:
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            c.request(Echo(payload=b"x"))
            sent += 1
    a = wait_for(lambda: next(x for x in httpx.get(base + "/api/state").json()["agents"]
                              if x["agent"] == "a" and x["msgs_per_s"] > 20), timeout=5, what="a's message rate")
    assert a["errors"] == 0
    a = wait_for(lambda: next(x for x in httpx.get(base + "/api/state").json()["agents"]
                              if x["agent"] == "a" and x["gauges"].get("echoed") == sent), timeout=5, what="a's gauges")


def test_token_is_required_off_loopback_and_checked(write_config, run_agents):
    _, cfg = write_config(chain(dashboard_bind="0.0.0.0"))
    with pytest.raises(ConfigError) as exc:
        check_kinds(cfg)
    assert "dashboard_token" in str(exc.value) and "not loopback" in str(exc.value)
    token = "s3cret-token-0123456789"
    _, cfg = write_config(chain(dashboard_token=token), name="token.yaml")
    run_agents(cfg, "twin")
    base = dashboard_url(cfg)
    wait_for(lambda: httpx.get(base + "/healthz").status_code == 200, timeout=10, what="dashboard up")
    for path in ("/", "/api/state", "/events", "/app.js"):
        r = httpx.get(base + path, timeout=5)
        assert r.status_code == 401 and "token" in r.text, path
    assert httpx.get(base + "/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(base + "/api/state", headers={"Authorization": f"Bearer {token}"}).json()["agents"]
    r = httpx.get(base + f"/?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/" and "HttpOnly" in r.headers["set-cookie"]
    with httpx.Client(base_url=base, follow_redirects=True) as browser:   # the cookie it set is enough from then on
        assert browser.get(f"/?token={token}").status_code == 200
        assert browser.get("/api/state").status_code == 200


def test_bad_requests_leave_the_dashboard_serving(write_config, run_agents):
    _, cfg = write_config(chain())
    run_agents(cfg, "twin")
    base = dashboard_url(cfg)
    port = cfg.mesh.base_port + 80
    wait_for(lambda: httpx.get(base + "/healthz").status_code == 200, timeout=10, what="dashboard up")
    for raw in (b"\x00\xff garbage\r\n\r\n", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 70000 + b"\r\n\r\n", b"POST /api/state HTTP/1.1\r\n\r\n", b""):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1024)
            except OSError:
                pass
    # many stream clients that go away at once
    socks = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    for s in socks:
        s.close()
    assert httpx.get(base + "/api/state").json()["agents"][0]["agent"] == "twin"
    assert fetch_status(cfg).agents[0].state == "ready"


def test_alerts_for_a_dead_agent_flapping_and_an_unreachable_host(write_config, run_agents):
    """Agents of a second host are registered by hand, then fall silent: the host is unreachable.
    A local agent killed and started again three times flaps."""
    d = mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"], "required": False},
                   "far": {"kind": "echo", "required": False}},
                  hosts={"local": {"address": "127.0.0.1"}, "pc2": {"address": "127.0.0.2"}},
                  groups={"core": {"host": "local", "agents": ["twin", "a"]},
                          "remote": {"host": "pc2", "agents": ["far"]}})
    d["agents"]["twin"]["settings"] = {"flap_count": 3, "flap_window_s": 60}
    _, cfg = write_config(d)
    run_agents(cfg, "twin")
    ctx = zmq.Context()
    got: list[Alert] = []
    sub = Subscriber(ctx, lambda t, env: got.append(env.message), metrics=MeshMetrics("t", "t"))
    sub.connect(cfg.endpoint("twin", "pub"))
    sub.subscribe("twin.alert")
    time.sleep(0.3)

    def alerts(kind: str, **match) -> list[Alert]:
        sub.on_readable()
        return [x for x in got if x.kind == kind and all(getattr(x, k) == v for k, v in match.items())]

    try:
        with client(cfg, "twin") as c:
            c.request(Register(agent="far", kind="echo", host="pc2", instance="i-far", pid=1, state="starting"))
            c.request(Heartbeat(agent="far", instance="i-far", state="ready"))
        wait_for(lambda: alerts("host_unreachable", host="pc2"), timeout=5, what="host unreachable alert")
        assert not alerts("agent_dead", agent="far")    # the host is the news, not each of its agents
        with client(cfg, "twin") as c:
            c.request(Heartbeat(agent="far", instance="i-far", state="ready"))
        wait_for(lambda: alerts("host_recovered", host="pc2"), timeout=5, what="host recovered alert")

        for i in range(3):
            [agent] = run_agents(cfg, "a")
            wait_for(lambda: fetch_status(cfg).agents[1].state == "ready", timeout=10, what="a ready")
            crash(agent.agent)
            agent.thread.join(10)
            wait_for(lambda: len(alerts("agent_dead", agent="a")) == i + 1, timeout=5, what=f"dead alert {i + 1}")
        flaps = wait_for(lambda: alerts("agent_flapping", agent="a"), timeout=5, what="flapping alert")
        assert len(flaps) == 1 and "3 deaths or restarts" in flaps[0].message
        assert len(alerts("agent_recovered", agent="a")) == 2
        dead = alerts("agent_dead", agent="a")[0]
        assert dead.severity == "warning" and "no heartbeat" in dead.message   # a is optional: a warning
        shown = wait_for(lambda: (a := httpx.get(dashboard_url(cfg) + "/api/state").json()["alerts"])
                         and a[0]["kind"] == "agent_flapping" and a, timeout=3, what="the alerts on the dashboard")
        assert {x["kind"] for x in shown} >= {"agent_dead", "agent_flapping", "agent_recovered", "host_unreachable",
                                              "host_recovered"}
    finally:
        sub.close()
        ctx.term()


def crash(agent) -> None:
    """Stops an in-process agent the way a crash would: no deregistration, the twin just stops hearing it."""
    def now() -> None:
        agent._registered = False
        agent._stop_requested.set()
    agent.reactor.call_soon_threadsafe(now)


class SlowStart(EchoAgent):
    """Loads "a model" for 2.5 s in on_ready, on its reactor thread: no heartbeat meanwhile."""

    def on_ready(self) -> None:
        time.sleep(2.5)


def test_an_agent_loading_in_on_ready_is_not_declared_dead(write_config, run_agents):
    """dead_after is 0.6 s here: a silent agent in on_ready is given loading_grace_s instead."""
    _, cfg = write_config(mesh_dict({"slow": {"kind": "tests.test_dashboard:SlowStart", "depends_on": ["twin"]}}))
    run_agents(cfg, "twin", "slow")
    seen = []
    base = dashboard_url(cfg)
    end = time.monotonic() + 8
    while time.monotonic() < end:
        slow = next(a for a in httpx.get(base + "/api/state").json()["agents"] if a["agent"] == "slow")
        seen.append((slow["state"], slow["detail"]))
        if slow["state"] == "ready":
            break
        time.sleep(0.1)
    states = [state for state, _ in seen]
    assert states[-1] == "ready" and "dead" not in states, seen
    assert any(d.startswith("starting up (on_ready)") for _, d in seen), seen
    assert not httpx.get(base + "/api/state").json()["alerts"]


# --- the page in a real browser -------------------------------------------------------------------

@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        missing(reason("chromium"))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e .[test])")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def desktop_page(chromium):
    """A 1280x900 page of the dashboard's browser, and the list its script errors and console errors go to."""
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


def test_dashboard_in_chromium_shows_every_agent_and_a_kill_live(write_config, mesh_up, chromium):
    path, cfg = write_config(mesh_dict({"a": {"kind": "echo", "depends_on": ["twin"]},
                                        "b": {"kind": "echo", "depends_on": ["a"], "required": False},
                                        "c": {"kind": "echo", "depends_on": ["a"], "required": False}},
                                       groups={"core": {"host": "local", "agents": ["twin", "a"]},
                                               "workers": {"host": "local", "agents": ["b", "c"]}},
                                       heartbeat_interval_s=0.5))
    mesh_up(path, "--restart-backoff", "120")   # a killed agent stays dead for the test
    wait_for(lambda: fetch_status(cfg, timeout=0.5).mesh_state == "ready", timeout=30, what="mesh ready")
    out = OUTPUT / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    page, errors = desktop_page(chromium)
    page.goto(dashboard_url(cfg) + "/")
    for agent in ("twin", "a", "b", "c"):
        page.wait_for_selector(f'tr[data-agent="{agent}"][data-state="ready"]', timeout=15000)
    assert page.locator("tr[data-agent]").count() == 4
    assert page.locator("#mesh-state").inner_text() == "ready"
    assert page.locator(".group h4").all_inner_texts() == ["container core", "container workers"]
    assert page.locator("#graph g[data-node]").count() == 4
    page.wait_for_selector("#live.on", timeout=10000)
    page.screenshot(path=str(out / "1-all-ready.png"), full_page=True)

    victim = next(s for s in fetch_status(cfg).agents if s.agent == "b")
    marker = page.evaluate("() => { window.__notReloaded = true; return true; }")
    os.kill(victim.pid, signal.SIGKILL)
    page.wait_for_selector('tr[data-agent="b"][data-state="dead"]', timeout=15000)
    assert page.evaluate("() => window.__notReloaded === true") and marker   # the same page, updated live
    assert page.locator('tr[data-agent="b"] .state').inner_text() == "dead"
    assert page.locator('tr[data-agent="c"]').get_attribute("data-state") == "ready"
    page.wait_for_selector('#alerts li[data-kind="agent_dead"]', timeout=10000)
    assert "b is dead" in page.locator('#alerts li[data-kind="agent_dead"]').first.inner_text()
    assert page.locator("#mesh-state").inner_text() == "degraded"
    page.screenshot(path=str(out / "2-b-killed.png"), full_page=True)

    phone = chromium.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, device_scale_factor=2)
    phone.goto(dashboard_url(cfg) + "/")
    phone.wait_for_selector('tr[data-agent="b"][data-state="dead"]', timeout=15000)
    width = phone.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 390, f"the page is {width}px wide on a 390px phone"
    phone.screenshot(path=str(out / "3-phone.png"), full_page=True)
    assert not errors, errors
    assert (out / "2-b-killed.png").stat().st_size > 10000


TEXTS = ["Apples and pears grow in orchards; the harvest comes in autumn and the fruit keeps for months.",
         "The tide rises twice a day as the moon pulls the ocean; sailors time their departures by it.",
         "A compiler turns source code into machine code, checking types and optimising loops on the way.",
         "Violins, violas and cellos make up the string section, tuned in fifths and played with a bow.",
         "Glaciers carve valleys over thousands of years, leaving moraines where the ice stops and melts."]


def test_dashboard_in_chromium_shows_how_far_behind_the_topic_model_is(write_config, run_agents, chromium):
    """A real topic model on a real store holding five pages fetched two minutes ago: the page shows them all
    waiting ("scored 0 of 5 (backlog 5, oldest 2m …)") until its first pass (poll_s after it is ready), then,
    without a reload, "scored 5 of 5 (backlog 0)" and its speed."""
    for module in ("sentence_transformers", "openvino", "faiss"):
        if importlib.util.find_spec(module) is None:
            missing(f"{module} is not installed (the model extra: `pip install -e '.[model,test]'`)")
    _, cfg = write_config(mesh_dict({"topics": {"kind": "topic_model", "depends_on": ["twin"],
                                                "settings": {"source": None, "poll_s": 8.0, "max_chunks": 1}}}))
    fetched = time.time() - 125
    with open_docstore(cfg.store_url("documents")) as store:
        for i, text in enumerate(TEXTS):
            url = f"http://pages.example/{i}"
            store.upsert(Document(url=url, final_url=url, content_hash=f"{i:064x}", fetched_at=fetched + i,
                                  http_status=200, content_type="text/html", state="extracted", text=text))
    run_agents(cfg, "twin", "topics")
    base = dashboard_url(cfg)
    wait_for(lambda: httpx.get(base + "/healthz").status_code == 200, timeout=10, what="dashboard up")
    out = OUTPUT / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    page, errors = desktop_page(chromium)
    page.goto(base + "/")
    figure = '#pipeline [data-figure="topic-backlog"]'
    page.wait_for_selector(f'{figure}[data-backlog="5"]', timeout=120000)   # the model loads first
    waiting = page.locator(f"{figure} dd").inner_text()
    assert re.fullmatch(r"scored 0 of 5 \(backlog 5, oldest \dm \d+s\)", waiting), waiting
    assert page.locator(f"{figure} dt").inner_text() == "topic model"
    page.screenshot(path=str(out / "4-topic-backlog.png"), full_page=True)
    page.evaluate("() => { window.__notReloaded = true; }")
    page.wait_for_selector(f'{figure}[data-backlog="0"]', timeout=60000)
    done = page.locator(f"{figure} dd").inner_text()
    assert re.fullmatch(r"scored 5 of 5 \(backlog 0\) [\d,.]+/min", done), done
    assert page.evaluate("() => window.__notReloaded === true")             # the same page, updated live
    page.screenshot(path=str(out / "5-topic-caught-up.png"), full_page=True)
    assert not errors, errors
