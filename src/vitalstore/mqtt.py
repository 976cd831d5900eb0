"""MQTT ingest: a shared subscription whose messages are acknowledged only after they commit.

One paho-mqtt client per process, driven by the event loop (paho's socket callbacks: no
thread, so an acknowledgement can never go out on a connection other than the one its
message came on). MQTT 5, QoS 1, a persistent session (no clean start, a session expiry) and
manual acknowledgements: a message whose readings are not committed stays with the broker,
which sends it again after a reconnect; first write wins keeps it stored once.

Backpressure: the broker sends at most `mqtt_receive_maximum` unacknowledged messages. While
the buffer is full or the database is down, messages are retried here and not acknowledged,
so the flow stops at that many and resumes by itself. A bad payload is acknowledged (it would
fail forever), counted, logged and published with its error to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import logging
import os
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from typing import IO, Any

import msgspec
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from vitalstore.api.responses import JSON, NDJSON
from vitalstore.problems import InvalidItems, MalformedBody, Rejected, RetryLater, TooManyReadings
from vitalstore.readings import Reading
from vitalstore.services import Services
from vitalstore.settings import Settings

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
RETRY_MAX_S = 2.0


class _BadMessage(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int
    username: str | None
    password: str | None


def parse_url(url: str) -> Broker:
    """`mqtt://[user:password@]host[:port]`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
        raise ValueError(f"VITALSTORE_MQTT_URL must be mqtt://[user:password@]host:port: {url!r}")
    return Broker(parts.hostname, parts.port or 1883,
                  urllib.parse.unquote(parts.username) if parts.username else None,
                  urllib.parse.unquote(parts.password) if parts.password else None)


def default_client_id(settings: Settings) -> tuple[str, IO[bytes] | None]:
    """`vitalstore-<host>-<port>`, the same after a restart; `-<n>` per worker with several.

    Granian does not number its workers, so each takes the first free slot of a lock file
    (released by the kernel when the process dies, kill -9 included). Returns the id and the
    lock to keep open.
    """
    base = settings.mqtt_client_id or f"vitalstore-{socket.gethostname()}-{settings.port}"
    if settings.workers <= 1:
        return base, None
    for slot in range(settings.workers):
        path = os.path.join(tempfile.gettempdir(), f"{base}-{slot}.lock")
        lock = open(path, "wb")  # noqa: SIM115 (kept open: it is the lock)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return f"{base}-{slot}", lock
    raise RuntimeError("no free MQTT client slot: more workers than VITALSTORE_WORKERS?")


class MqttIngest:
    """Consumes the shared subscription into the Batcher, acknowledging after commit."""

    def __init__(self, settings: Settings, services: Services) -> None:
        self._settings = settings
        self._services = services
        self._broker = parse_url(settings.mqtt_url)
        self._filters = [t.strip() for t in settings.mqtt_topics.split(",") if t.strip()]
        self.client_id, self._slot_lock = default_client_id(settings)
        self.connected = False
        self.subscribed = False
        self.reconnects = 0
        self.unacknowledged = 0  # messages taken and not yet acknowledged
        self._generation = 0  # one per connection: an ack only on the connection it came on
        self._closing = False
        self._disconnected = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=paho.MQTTv5, manual_ack=True)
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        loop = asyncio.get_running_loop()

        def closed(c: paho.Client, _: Any, sock: Any) -> None:
            loop.remove_reader(sock)

        def written(c: paho.Client, _: Any, sock: Any) -> None:
            loop.remove_writer(sock)

        client.on_socket_open = lambda c, _, sock: loop.add_reader(sock, c.loop_read)
        client.on_socket_close = closed
        client.on_socket_register_write = lambda c, _, sock: loop.add_writer(sock, c.loop_write)
        client.on_socket_unregister_write = written
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        # The client's own queue of outgoing messages (dead letters) stays bounded too.
        client.max_queued_messages_set(1000)
        return client

    def problems(self) -> list[str]:
        """What keeps /ready at 503."""
        if not self.connected:
            return ["mqtt: not connected to the broker"]
        if not self.subscribed:
            return ["mqtt: not subscribed"]
        return []

    def state(self) -> dict[str, Any]:
        return {"connected": self.connected, "subscribed": self.subscribed,
                "client_id": self.client_id, "unacknowledged": self.unacknowledged,
                "reconnects": self.reconnects}

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="mqtt")

    async def close(self) -> None:
        """Stop taking messages; acknowledge what commits within the shutdown time; disconnect."""
        self._closing = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks),
                                            timeout=self._settings.shutdown_timeout_s)
            for task in pending:
                task.cancel()  # not acknowledged: the broker sends it again after a restart
        if self.connected:
            self._client.disconnect()
            try:
                async with asyncio.timeout(2):
                    await self._disconnected.wait()
            except TimeoutError:
                pass
        if self._runner is not None:
            self._runner.cancel()
        if self._slot_lock is not None:
            self._slot_lock.close()

    # -- connection -----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while not self._closing:
            if not first:
                self.reconnects += 1
                self._services.telemetry.mqtt_reconnects.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            first = False
            try:
                await self._connect()
            except (OSError, TimeoutError) as exc:
                log.warning("MQTT broker %s:%d not reachable: %s", self._broker.host,
                            self._broker.port, exc)
                continue
            connected_at = asyncio.get_running_loop().time()
            while not self._disconnected.is_set():
                self._client.loop_misc()  # keepalive pings
                try:
                    async with asyncio.timeout(1):
                        await self._disconnected.wait()
                except TimeoutError:
                    pass
            if asyncio.get_running_loop().time() - connected_at > 5:
                delay = 0.1  # it held a while: a fresh failure, retry soon

    async def _connect(self) -> None:
        # paho connects with a blocking socket call: first make sure it will not block the
        # event loop for long (an unreachable host fails here, asynchronously).
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(self._broker.host, self._broker.port), timeout=5)
        writer.close()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self._settings.mqtt_session_expiry_s
        properties.ReceiveMaximum = self._settings.mqtt_receive_maximum
        # The broker drops (rather than sends) a message larger than this.
        properties.MaximumPacketSize = self._settings.max_body_bytes + 65_536
        self._disconnected.clear()
        self._generation += 1
        self._client.connect(self._broker.host, self._broker.port, keepalive=KEEPALIVE_S,
                             clean_start=False, properties=properties)

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any,
                    reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            log.error("MQTT broker refused the connection: %s", reason)
            return
        self.connected = True
        self._set_gauges()
        log.info("MQTT connected as %s (session present: %s)", self.client_id,
                 flags.session_present)
        group = self._settings.mqtt_group
        client.subscribe([(f"$share/{group}/{topic}", SubscribeOptions(qos=1))
                          for topic in self._filters])

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("MQTT subscription refused: %s", ", ".join(failed))
            return
        self.subscribed = True
        log.info("MQTT subscribed to %s in group %s", ", ".join(self._filters),
                 self._settings.mqtt_group)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any,
                       reason: ReasonCode, properties: Any) -> None:
        if self.connected and not self._closing:
            log.warning("MQTT connection lost: %s", reason)
        self.connected = self.subscribed = False
        self._generation += 1  # what is unacknowledged comes again on the next connection
        self._set_gauges()
        self._disconnected.set()

    def _set_gauges(self) -> None:
        metrics = self._services.telemetry
        metrics.mqtt_connected.set(1 if self.subscribed or self.connected else 0)
        metrics.mqtt_unacknowledged.set(self.unacknowledged)

    # -- messages -------------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if self._closing:
            return  # not acknowledged: sent again to this session or another of the group
        self.unacknowledged += 1
        self._services.telemetry.mqtt_messages.labels("taken").inc()
        task = asyncio.create_task(self._handle(message, self._generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: paho.MQTTMessage, generation: int) -> None:
        try:
            outcome = await self._store(message, generation)
        finally:
            self.unacknowledged -= 1
            self._services.telemetry.mqtt_unacknowledged.set(self.unacknowledged)
        if outcome is None:
            return
        self._services.telemetry.mqtt_messages.labels(outcome).inc()
        if message.qos > 0 and generation == self._generation:
            self._client.ack(message.mid, message.qos)

    async def _store(self, message: paho.MQTTMessage, generation: int) -> str | None:
        """Commit the message's readings: "committed", "dead_lettered", or None (not now)."""
        services = self._services
        device = self._device_of(message.topic)
        try:
            readings = _decode(services, bytes(message.payload), device)
            if device is not None:
                other = next((r.device for r in readings if r.device != device), None)
                if other is not None:
                    raise _BadMessage(f"payload device {other!r} is not the topic's {device!r}")
            if not readings:
                return "committed"
            delay = 0.05
            while True:
                try:
                    rows = await services.rows(readings)
                    await services.batcher.submit(rows)
                    return "committed"
                except RetryLater:
                    # Withheld: once receive-maximum messages wait here, the broker stops.
                    if generation != self._generation or self._closing:
                        return None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
        except (_BadMessage, MalformedBody, TooManyReadings, Rejected) as exc:
            self._dead_letter(message, device, str(exc))
        except InvalidItems as exc:
            self._dead_letter(message, device, "; ".join(
                f"item {e.index}: {e.field + ': ' if e.field else ''}{e.message}"
                for e in exc.errors))
        return "dead_lettered"

    def _device_of(self, topic: str) -> str | None:
        """The topic level where the matching filter has its `+` (None: the filter has none)."""
        levels = topic.split("/")
        for topic_filter in self._filters:
            if paho.topic_matches_sub(topic_filter, topic):
                filter_levels = topic_filter.split("/")
                if "+" in filter_levels:
                    return levels[filter_levels.index("+")]
                return None
        return None

    def _dead_letter(self, message: paho.MQTTMessage, device: str | None, error: str) -> None:
        """Published before the original is acknowledged, on the same connection (in order)."""
        log.warning("MQTT message on %s refused: %s", message.topic, error[:500])
        record: dict[str, Any] = {"topic": message.topic, "error": error}
        try:
            record["payload"] = message.payload.decode()
        except UnicodeDecodeError:
            record["payload_base64"] = base64.b64encode(message.payload).decode()
        topic = self._settings.mqtt_dead_letter.replace("{device}", device or "unknown")
        sent = self._client.publish(topic, msgspec.json.encode(record), qos=1)
        if sent.rc != paho.MQTT_ERR_SUCCESS:
            log.error("dead letter to %s not sent: %s", topic, paho.error_string(sent.rc))


def _decode(services: Services, payload: bytes, device: str | None) -> list[Reading]:
    """What POST /v1/readings takes: a JSON object or array, else NDJSON lines."""
    try:
        return services.validator.decode(payload, JSON, device)
    except MalformedBody:
        if b"\n" not in payload.strip():
            raise
    return services.validator.decode(payload, NDJSON, device)
