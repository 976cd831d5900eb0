"""MQTT ingest against a real Mosquitto, published with paho-mqtt (a client no one here wrote).

The shared broker at 127.0.0.1:1883 for most tests (each with its own topics, group and client
ids); a broker of the test's own on a free port where the broker is restarted or messages
must queue beyond Mosquitto's default limit.
"""

# The services and brokers run in other processes: blocking waits and HTTP checks in these
# async tests hold up nothing but the test itself.
# ruff: noqa: ASYNC109, ASYNC210, ASYNC251
from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from conftest import ROOT, free_port
from harness import Service

SHARED_BROKER = 1883
NOW = int(time.time()) - 3600


def serve(db_url: str, headers: dict[str, str], ready_path: str = "/ready", **env: str
          ) -> Service:
    """`vitalstore serve` in its own process group (call `.start()`); stopped by the caller."""
    return Service(db_url, env, name="server", port=free_port(), headers=dict(headers),
                   log_dir=ROOT / ".pytest_cache", log_level=None, ready_path=ready_path)


class Publisher:
    """A paho-mqtt publisher (QoS 1) that knows which messages the broker acknowledged."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                                  client_id=f"pub-{uuid.uuid4().hex[:8]}")
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._sent: list[tuple[int, paho.MQTTMessageInfo]] = []

    @property
    def acked(self) -> set[int]:
        """Numbers of the messages the broker acknowledged (PUBACK) to this publisher."""
        return {number for number, info in list(self._sent) if info.is_published()}

    def publish(self, topic: str, payload: Any, number: int = 0) -> paho.MQTTMessageInfo:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1)
        self._sent.append((number, info))
        return info

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def publisher() -> Iterator[Callable[[int], Publisher]]:
    made: list[Publisher] = []

    def make(port: int = SHARED_BROKER) -> Publisher:
        made.append(Publisher(port))
        return made[-1]

    yield make
    for pub in made:
        pub.close()


class Broker:
    """Mosquitto of the test's own, on a free port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.config = directory / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                               "persistence false\nmax_queued_messages 100000\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.process = subprocess.Popen(["mosquitto", "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), 10, "broker listening")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path).start()
    yield broker
    broker.stop()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def topics() -> str:
    """A topic prefix no other test (or helper) uses."""
    return f"t{uuid.uuid4().hex[:10]}"


def mqtt_env(prefix: str, port: int = SHARED_BROKER, **extra: str) -> dict[str, str]:
    return {"VITALSTORE_MQTT_URL": f"mqtt://127.0.0.1:{port}",
            "VITALSTORE_MQTT_TOPICS": f"{prefix}/+/readings",
            "VITALSTORE_MQTT_GROUP": f"g-{prefix}",
            "VITALSTORE_MQTT_CLIENT_ID": f"vs-{prefix}-{uuid.uuid4().hex[:4]}",
            "VITALSTORE_MQTT_DEAD_LETTER": f"{prefix}-errors/{{device}}", **extra}


async def count(db: asyncpg.Connection, prefix: str) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name LIKE $1", prefix + "%"))


async def wait_count(db: asyncpg.Connection, prefix: str, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await count(db, prefix)
        if found >= expected:
            return found
        time.sleep(0.1)
    return await count(db, prefix)


def metric(server: Service, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name))


async def test_messages_of_1_and_100_readings_are_all_stored(server_factory, publisher, db,
                                                             topics):
    server = server_factory(**mqtt_env(topics))
    pub = publisher()
    device = f"{topics}-a"
    for n in range(50):  # one reading each, the device from the topic
        pub.publish(f"{topics}/{device}/readings", {"timestamp": NOW + n, "hr": 60 + n % 30})
    for batch in range(10):  # 100 readings each, naming the same device
        pub.publish(f"{topics}/{device}/readings",
                    [{"device": device, "timestamp": NOW + 1000 + batch * 100 + i, "hr": 70,
                      "spo2": 97} for i in range(100)])
    ndjson = "\n".join(json.dumps({"timestamp": NOW - 100 - i, "hr": 1}) for i in range(3))
    pub.publish(f"{topics}/{device}/readings", ndjson.encode())
    assert await wait_count(db, topics, 50 + 2_000 + 3, 30) == 2_053
    assert metric(server, 'vitalstore_mqtt_messages_total{outcome="committed"}') == 61
    ready = httpx.get(server.url + "/ready", timeout=5).json()
    assert ready["mqtt"]["subscribed"] is True
    assert ready["mqtt"]["unacknowledged"] == 0


async def test_invalid_payloads_reach_the_dead_letter_topic(server_factory, publisher, db,
                                                            topics):
    server = server_factory(**mqtt_env(topics))
    letters: list[dict[str, Any]] = []
    watcher = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    watcher.on_message = lambda c, u, m: letters.append({**json.loads(m.payload),
                                                         "letter_topic": m.topic})
    watcher.connect("127.0.0.1", SHARED_BROKER)
    watcher.subscribe(f"{topics}-errors/#", qos=1)
    watcher.loop_start()
    try:
        time.sleep(0.5)
        pub = publisher()
        good = f"{topics}-good"
        pub.publish(f"{topics}/{topics}-bad1/readings", b"{not json")
        pub.publish(f"{topics}/{topics}-bad2/readings",
                    b'{"timestamp": %d, "hr": 1e400}' % NOW)
        pub.publish(f"{topics}/{topics}-bad3/readings",
                    {"device": "someone-else", "timestamp": NOW, "hr": 1})
        pub.publish(f"{topics}/{topics}-bad4/readings", {"timestamp": 1, "hr": 1})
        pub.publish(f"{topics}/{good}/readings", {"timestamp": NOW, "hr": 1})
        wait_for(lambda: len(letters) == 4, 20, "4 dead letters")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    by_topic = {letter["letter_topic"]: letter for letter in letters}
    assert by_topic[f"{topics}-errors/{topics}-bad1"]["topic"] == f"{topics}/{topics}-bad1/readings"
    assert "malformed JSON" in by_topic[f"{topics}-errors/{topics}-bad1"]["error"]
    assert by_topic[f"{topics}-errors/{topics}-bad1"]["payload"] == "{not json"
    assert "out of range" in by_topic[f"{topics}-errors/{topics}-bad2"]["error"]
    assert "is not the topic's" in by_topic[f"{topics}-errors/{topics}-bad3"]["error"]
    assert "before 2000" in by_topic[f"{topics}-errors/{topics}-bad4"]["error"]
    assert await wait_count(db, good, 1, 10) == 1
    assert await count(db, f"{topics}-bad") == 0
    assert await count(db, "someone-else") == 0
    assert metric(server, 'vitalstore_mqtt_messages_total{outcome="dead_lettered"}') == 4


async def test_ready_is_503_until_subscribed_and_a_broker_restart_is_survived(
        db_url, api_headers, publisher, db, topics, tmp_path):
    broker = Broker(tmp_path)  # not started yet: nothing listens on its port
    server = serve(db_url, api_headers, ready_path="/health", **mqtt_env(topics, broker.port))
    try:
        server.start()
        time.sleep(1)
        answer = httpx.get(server.url + "/ready", timeout=5)
        assert answer.status_code == 503
        assert "mqtt: not connected to the broker" in answer.json()["problems"]
        broker.start()
        wait_for(lambda: httpx.get(server.url + "/ready", timeout=5).status_code == 200, 15,
                 "ready once the broker is up")
        broker.stop()  # the broker restarts (its sessions and subscriptions lost)
        wait_for(lambda: httpx.get(server.url + "/ready", timeout=5).status_code == 503, 15,
                 "not ready while the broker is down")
        broker.start()
        wait_for(lambda: httpx.get(server.url + "/ready", timeout=5).status_code == 200, 15,
                 "ready again")
        pub = publisher(broker.port)
        pub.publish(f"{topics}/{topics}-x/readings", {"timestamp": NOW, "hr": 1}
                    ).wait_for_publish(5)
        assert await wait_count(db, topics, 1, 10) == 1
        assert metric(server, "vitalstore_mqtt_reconnects_total") >= 1
    finally:
        server.stop(graceful=False)
        broker.stop()


async def test_kill_9_mid_stream_then_restart_stores_every_acknowledged_message_once(
        db_url, api_headers, publisher, db, topics, own_broker):
    env = mqtt_env(topics, own_broker.port)
    server = serve(db_url, api_headers, **env).start()
    pub = publisher(own_broker.port)
    total = 3_000
    stop = threading.Event()

    def stream() -> None:
        for n in range(total):
            if stop.is_set():
                return
            pub.publish(f"{topics}/{topics}-d{n % 20}/readings",
                        {"timestamp": NOW + n // 20, "hr": n}, number=n)
            time.sleep(0.001)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        assert await wait_count(db, topics, 300, 30) >= 300
        server.signal(9)  # kill -9 of the whole process group, mid-stream
        server.process.wait(10)
        time.sleep(0.5)
        # The same client id: the persistent session's messages come again.
        server = serve(db_url, api_headers, **env).start()
        sender.join(60)
        wait_for(lambda: len(pub.acked) == total, 30, "every publish acknowledged")
        stored = await wait_count(db, topics, total, 60)
    finally:
        stop.set()
        sender.join(10)
        server.stop(graceful=False)
    assert stored == total
    rows = await db.fetch(
        "SELECT d.name, r.ts, r.value FROM readings r JOIN devices d ON d.id = r.device_id"
        " WHERE d.name LIKE $1", topics + "%")
    assert sorted(int(r["value"]) for r in rows) == sorted(pub.acked)  # each once


async def test_two_processes_split_the_shared_subscription(db_url, api_headers, publisher, db,
                                                           topics):
    env = mqtt_env(topics)
    first = serve(db_url, api_headers, **env).start()
    second = serve(db_url, api_headers,
                    **{**env, "VITALSTORE_MQTT_CLIENT_ID": env["VITALSTORE_MQTT_CLIENT_ID"] + "b"}
                    ).start()
    try:
        pub = publisher()
        for n in range(1_000):
            pub.publish(f"{topics}/{topics}-d{n % 10}/readings",
                        {"timestamp": NOW + n // 10, "hr": n}, number=n)
        assert await wait_count(db, topics, 1_000, 30) == 1_000
        committed = 'vitalstore_mqtt_messages_total{outcome="committed"}'
        wait_for(lambda: metric(first, committed) + metric(second, committed) == 1_000, 10,
                 "both counts published")
        assert metric(first, committed) > 0 and metric(second, committed) > 0
    finally:
        first.stop(graceful=False)
        second.stop(graceful=False)


async def test_a_stalled_database_withholds_acknowledgements_and_loses_nothing(
        server_factory, publisher, db, db_url, topics):
    server = server_factory(**mqtt_env(topics, VITALSTORE_MQTT_RECEIVE_MAXIMUM="50"))
    locker = await asyncpg.connect(db_url)
    pub = publisher()
    try:
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")
        for n in range(300):
            pub.publish(f"{topics}/{topics}-d/readings", {"timestamp": NOW + n, "hr": n})
        state = wait_for(lambda: (lambda s: s if s["unacknowledged"] >= 50 else None)(
            httpx.get(server.url + "/ready", timeout=5).json()["mqtt"]), 15, "50 withheld")
        time.sleep(1)
        state = httpx.get(server.url + "/ready", timeout=5).json()["mqtt"]
        # The broker stops at the receive maximum: nothing beyond it is taken (or buffered).
        assert state["unacknowledged"] == 50
        assert metric(server, 'vitalstore_mqtt_messages_total{outcome="committed"}') == 0
        await transaction.rollback()
    finally:
        await locker.close()
    assert await wait_count(db, topics, 300, 60) == 300
