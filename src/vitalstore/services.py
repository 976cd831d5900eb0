"""The objects route handlers use, built in the app's lifespan from the settings."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from vitalstore.auth import KeyStore
from vitalstore.batcher import Batcher
from vitalstore.readings import Validator
from vitalstore.settings import Settings
from vitalstore.telemetry import Telemetry
from vitalstore.writer import NameIds


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
