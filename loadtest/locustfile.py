"""A hospital fleet for locust: writers that look like real devices, readers like real staff.

Writers (each user is one device, or one gateway):
  BedsideMonitor   one reading a second: heart rate, SpO2, respiratory rate
  Wearable         a batch of 10 readings (one a second) every 10 s: heart rate, steps, skin
                   temperature
  Gateway          NDJSON every 5 s with 5 s of readings of many home devices
  BloodPressureCuff  every 15 minutes: systolic, diastolic, mean arterial pressure, pulse
Readers:
  Dashboard        polls GET /v1/latest for the beds of one ward every 2 s
  Clinician        opens a device: 24 h of 1-minute aggregates, the last hour of raw history

Values wander within physiological ranges; every device clock has its own offset and drift;
a few readings arrive late (stuck in a queue for minutes) and a few requests are sent twice
(a retry after a lost acknowledgement). Requests are named by route, so the report groups
them. Options (command line, or the LOCUST_* environment variables shown):
  --ward-size (LOCUST_WARD_SIZE, 20)   --gateway-devices (LOCUST_GATEWAY_DEVICES, 50)
  --late-share (LOCUST_LATE_SHARE, 0.01)   --duplicate-share (LOCUST_DUPLICATE_SHARE, 0.01)
  --weights (LOCUST_WEIGHTS, "bedside=40,wearable=30,gateway=2,cuff=10,dashboard=5,
  clinician=5")
LOADTEST_API_KEY, when set, is sent as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from typing import Any

import gevent
from locust import between, constant_pacing, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment

HEADERS = {"Content-Type": "application/json"}
if os.environ.get("LOADTEST_API_KEY"):
    HEADERS["Authorization"] = f"Bearer {os.environ['LOADTEST_API_KEY']}"
READ_HEADERS = {k: v for k, v in HEADERS.items() if k != "Content-Type"}

# Shared by the users of this locust process: what has been stored, so readers ask for
# devices that exist, and the beds of each ward.
known_devices: list[str] = []
_known: set[str] = set()
wards: dict[int, list[str]] = {}
_bed_numbers = itertools.count()
_gateway_numbers = itertools.count()
settings: dict[str, Any] = {}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--ward-size", type=int, default=20, env_var="LOCUST_WARD_SIZE",
                        help="beds per ward (a dashboard shows one ward)")
    parser.add_argument("--gateway-devices", type=int, default=50,
                        env_var="LOCUST_GATEWAY_DEVICES", help="devices behind each gateway")
    parser.add_argument("--late-share", type=float, default=0.01, env_var="LOCUST_LATE_SHARE",
                        help="share of posts that also carry a reading minutes late")
    parser.add_argument("--duplicate-share", type=float, default=0.01,
                        env_var="LOCUST_DUPLICATE_SHARE",
                        help="share of posts sent twice (a retry after a lost answer)")
    parser.add_argument("--weights", default="", env_var="LOCUST_WEIGHTS",
                        help="user mix, e.g. bedside=40,wearable=30,gateway=2,cuff=10,"
                             "dashboard=5,clinician=5")


@events.init.add_listener
def _configure(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    settings.update(ward_size=options.ward_size, gateway_devices=options.gateway_devices,
                    late_share=options.late_share, duplicate_share=options.duplicate_share)
    classes = {"bedside": BedsideMonitor, "wearable": Wearable, "gateway": Gateway,
               "cuff": BloodPressureCuff, "dashboard": Dashboard, "clinician": Clinician}
    for pair in filter(None, options.weights.split(",")):
        name, _, weight = pair.partition("=")
        classes[name.strip()].weight = int(weight)


def remember(device: str) -> None:
    if device not in _known:
        _known.add(device)
        known_devices.append(device)


class Clock:
    """A device clock: off by up to 3 s and drifting by up to 200 ppm (0.7 s an hour)."""

    def __init__(self, rng: random.Random) -> None:
        self.offset = rng.uniform(-3, 3)
        self.drift = rng.uniform(-200e-6, 200e-6)
        self.started = time.time()

    def now(self) -> float:
        real = time.time()
        return real + self.offset + (real - self.started) * self.drift


class Vital:
    """A value that wanders (a bounded random walk) like a patient's vital sign."""

    def __init__(self, rng: random.Random, low: float, high: float, step: float,
                 digits: int = 0) -> None:
        self.rng, self.low, self.high, self.step, self.digits = rng, low, high, step, digits
        self.value = rng.uniform(low + (high - low) / 4, high - (high - low) / 4)

    def next(self) -> float:
        self.value = min(self.high, max(self.low, self.value + self.rng.gauss(0, self.step)))
        return round(self.value, self.digits) if self.digits else round(self.value)


class DeviceUser(FastHttpUser):
    """A device that posts readings; subclasses say what and how often."""

    abstract = True
    period = 1.0  # seconds between posts

    def on_start(self) -> None:
        self.rng = random.Random()
        self.clock = Clock(self.rng)
        self.device = self.make_name()
        self.last_body: bytes | None = None
        # Devices are switched on at random moments, not in step with locust's spawning:
        # without this offset a whole ward posts in the same millisecond every second.
        gevent.sleep(self.rng.uniform(0, min(self.period, 60)))

    def make_name(self) -> str:
        raise NotImplementedError

    def post(self, body: bytes, name: str, content_type: str = "application/json") -> None:
        headers = {**HEADERS, "Content-Type": content_type}
        devices = self.devices_in(body)
        with self.client.post("/v1/readings", data=body, headers=headers, name=name,
                              catch_response=True) as response:
            if response.status_code == 202:
                response.success()
                for device in devices:
                    remember(device)
            else:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
        if self.rng.random() < settings.get("duplicate_share", 0.01):
            # The device never saw the 202 and sends the same body again: stored once.
            self.client.post("/v1/readings", data=body, headers=headers,
                             name=f"{name} (retry)")
        self.last_body = body

    def devices_in(self, body: bytes) -> list[str]:
        return [self.device]

    def late(self, make: Any) -> list[dict[str, Any]]:
        """Now and then a reading from minutes ago, released from a device's queue."""
        if self.rng.random() >= settings.get("late_share", 0.01):
            return []
        return [make(self.clock.now() - self.rng.uniform(60, 1800))]


class BedsideMonitor(DeviceUser):
    weight = 40
    period = 1
    wait_time = constant_pacing(period)

    def make_name(self) -> str:
        bed = next(_bed_numbers)
        ward = bed // settings.get("ward_size", 20)
        name = f"ward{ward:02d}-bed{bed % settings.get('ward_size', 20):02d}"
        wards.setdefault(ward, []).append(name)
        self.hr = Vital(self.rng, 45, 140, 1.5)
        self.spo2 = Vital(self.rng, 88, 100, 0.4)
        self.rr = Vital(self.rng, 8, 30, 0.5)
        return name

    def reading(self, ts: float) -> dict[str, Any]:
        item: dict[str, Any] = {"device": self.device, "timestamp": round(ts, 3),
                                "heartRateValue": self.hr.next(), "spo2": self.spo2.next(),
                                "respiratoryRate": self.rr.next()}
        if self.rng.random() < 0.05:
            item["signalQuality"] = self.rng.choice(["good", "noisy", "lead-off"])
        return item

    @task
    def report(self) -> None:
        items = [self.reading(self.clock.now()), *self.late(self.reading)]
        body = items[0] if len(items) == 1 else items
        self.post(json.dumps(body).encode(), "/v1/readings [bedside]")


class Wearable(DeviceUser):
    weight = 30
    period = 10
    wait_time = constant_pacing(period)

    def make_name(self) -> str:
        self.hr = Vital(self.rng, 50, 160, 2.0)
        self.skin = Vital(self.rng, 31.0, 36.5, 0.05, digits=2)
        self.steps = 0
        return f"wearable-{self.rng.randrange(16**8):08x}"

    def reading(self, ts: float) -> dict[str, Any]:
        self.steps += self.rng.choice([0, 0, 1, 2, 2, 3])
        return {"device": self.device, "timestamp": round(ts, 3),
                "heartRateValue": self.hr.next(), "skinTemperature": self.skin.next(),
                "steps": self.steps, "battery": self.rng.choice(["ok", "ok", "ok", "low"])}

    @task
    def report(self) -> None:
        now = self.clock.now()
        items = [self.reading(now - 9 + second) for second in range(10)]
        self.post(json.dumps(items + self.late(self.reading)).encode(),
                  "/v1/readings [wearable x10]")


class Gateway(DeviceUser):
    """A home-care gateway relaying many devices, NDJSON, 5 s of readings at a time."""

    weight = 2
    period = 5
    wait_time = constant_pacing(period)

    def make_name(self) -> str:
        number = next(_gateway_numbers)
        count = settings.get("gateway_devices", 50)
        self.members = [f"home{number:03d}-{i:03d}" for i in range(count)]
        self.vitals = {d: (Vital(self.rng, 50, 120, 1.5), Vital(self.rng, 90, 100, 0.3),
                           Vital(self.rng, 35.5, 38.5, 0.05, digits=1)) for d in self.members}
        self.clocks = {d: Clock(self.rng) for d in self.members}
        return f"gateway-{number:03d}"

    def devices_in(self, body: bytes) -> list[str]:
        return self.members

    @task
    def relay(self) -> None:
        lines = []
        for device in self.members:
            hr, spo2, temp = self.vitals[device]
            now = self.clocks[device].now()
            for second in range(5):
                lines.append(json.dumps({"device": device, "timestamp": round(now - 4 + second, 3),
                                         "heartRateValue": hr.next(), "spo2": spo2.next(),
                                         "temperature": temp.next()}))
        self.post("\n".join(lines).encode() + b"\n",
                  f"/v1/readings [gateway ndjson x{len(lines)}]", "application/x-ndjson")


class BloodPressureCuff(DeviceUser):
    weight = 10
    period = 15 * 60
    wait_time = constant_pacing(period)

    def make_name(self) -> str:
        self.systolic = Vital(self.rng, 90, 180, 6)
        self.diastolic = Vital(self.rng, 55, 110, 4)
        return f"bpcuff-{self.rng.randrange(16**6):06x}"

    @task
    def measure(self) -> None:
        systolic, diastolic = self.systolic.next(), self.diastolic.next()
        body = {"device": self.device, "timestamp": round(self.clock.now(), 3),
                "systolic": systolic, "diastolic": min(diastolic, systolic - 20),
                "meanArterialPressure": round((systolic + 2 * diastolic) / 3, 1),
                "pulseRate": self.rng.randint(50, 110), "cuffSize": "adult"}
        self.post(json.dumps(body).encode(), "/v1/readings [bp cuff]")


class Dashboard(FastHttpUser):
    """A ward's central station: the latest values of every bed, every 2 s."""

    weight = 5
    wait_time = constant_pacing(2)

    @task
    def poll(self) -> None:
        ready = [beds for beds in wards.values() if any(b in _known for b in beds)]
        if not ready:
            return
        beds = random.choice(ready)
        query = urllib.parse.urlencode([("device", bed) for bed in beds])
        self.client.get(f"/v1/latest?{query}", headers=READ_HEADERS,
                        name="/v1/latest?device=[ward]")


class Clinician(FastHttpUser):
    """Opens a device: a day of 1-minute aggregates, then the last hour of readings."""

    weight = 5
    wait_time = between(5, 15)

    @task
    def review(self) -> None:
        if not known_devices:
            return
        device = urllib.parse.quote(random.choice(known_devices), safe="")
        now = datetime.now(UTC)
        day = urllib.parse.urlencode({"from": (now - timedelta(hours=24)).isoformat(),
                                      "to": now.isoformat(), "bucket": "1m"})
        self.client.get(f"/v1/devices/{device}/aggregates?{day}", headers=READ_HEADERS,
                        name="/v1/devices/[id]/aggregates 24h by 1m")
        hour = urllib.parse.urlencode({"from": (now - timedelta(hours=1)).isoformat()})
        self.client.get(f"/v1/devices/{device}/readings?{hour}", headers=READ_HEADERS,
                        name="/v1/devices/[id]/readings 1h")
        self.client.get(f"/v1/devices/{device}/latest", headers=READ_HEADERS,
                        name="/v1/devices/[id]/latest")
