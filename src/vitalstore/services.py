"""The objects route handlers use, built in the app's lifespan from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from vitalstore.auth import KeyStore
from vitalstore.batcher import Batcher
from vitalstore.database import CONNECTION_ERRORS
from vitalstore.problems import Unavailable
from vitalstore.readings import Reading, Validator
from vitalstore.settings import Settings
from vitalstore.telemetry import Telemetry
from vitalstore.writer import NameIds, Rows, to_rows

if TYPE_CHECKING:
    from vitalstore.mqtt import MqttIngest


@dataclass(slots=True)
class Services:
    settings: Settings
    validator: Validator
    pool: asyncpg.Pool
    batcher: Batcher
    device_ids: NameIds
    metric_ids: NameIds
    schema_head: str | None
    keys: KeyStore
    telemetry: Telemetry
    # False on an Apache-only TimescaleDB: no columnstore, no policy jobs.
    columnstore: bool
    mqtt: MqttIngest | None = None

    async def rows(self, readings: list[Reading]) -> Rows:
        """The readings as rows to write, their device and metric names registered."""
        try:
            device_ids = await self.device_ids.ids(
                self.pool, {r.device for r in readings}, create=True)
            metric_ids = await self.metric_ids.ids(
                self.pool, {name for r in readings for name, _ in r.metrics}, create=True)
        except CONNECTION_ERRORS as exc:
            raise Unavailable("database unavailable") from exc
        return to_rows(readings, device_ids, metric_ids)
