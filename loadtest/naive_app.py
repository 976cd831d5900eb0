"""The naive baseline: what many teams write first, for `make bench` to compare against.

FastAPI with a pydantic model, SQLAlchemy's async ORM with its default pool, uvicorn: per
request, look the device and the metrics up (creating what is missing), add one ORM object
per metric value, move the device's last-seen time, commit. Same database and tables as
vitalstore (its trigger keeps `latest` and the rollups), so both do the same storage work.
SQLAlchemy 2 sends the request's per-metric INSERTs as one batched statement
("insertmanyvalues"); everything else is a round trip of its own.

Run: NAIVE_DATABASE_URL=postgresql://... uvicorn naive_app:app --app-dir loadtest
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from sqlalchemy import DateTime, Float, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DATABASE_URL = os.environ.get(
    "NAIVE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/vitalstore"
).replace("postgresql://", "postgresql+asyncpg://", 1)

engine = create_async_engine(DATABASE_URL)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    first_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Metric(Base):
    __tablename__ = "metrics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)


class Reading(Base):
    __tablename__ = "readings"
    device_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    metric_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class ReadingIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    device: str
    timestamp: float


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def _get_or_create_device(session: AsyncSession, name: str, ts: datetime) -> Device:
    device = await session.scalar(select(Device).where(Device.name == name))
    if device is None:
        device = Device(name=name, first_seen=ts, last_seen=ts)
        session.add(device)
        await session.flush()
    return device


async def _metric_ids(session: AsyncSession, names: list[str]) -> dict[str, int]:
    found = {m.name: m.id for m in await session.scalars(select(Metric).where(
        Metric.name.in_(names)))}
    for name in names:
        if name not in found:
            metric = Metric(name=name)
            session.add(metric)
            await session.flush()
            found[name] = metric.id
    return found


async def _store(reading: ReadingIn) -> None:
    ts = datetime.fromtimestamp(reading.timestamp, UTC)
    values = {k: v for k, v in (reading.model_extra or {}).items()
              if isinstance(v, int | float) and not isinstance(v, bool)}
    async with Session() as session:
        device = await _get_or_create_device(session, reading.device, ts)
        metric_ids = await _metric_ids(session, sorted(values))
        for name, value in values.items():
            session.add(Reading(device_id=device.id, metric_id=metric_ids[name], ts=ts,
                                value=float(value)))
        if device.first_seen is None or ts < device.first_seen:
            device.first_seen = ts
        if device.last_seen is None or ts > device.last_seen:
            device.last_seen = ts
        await session.commit()


@app.post("/v1/readings", status_code=202)
async def post_reading(reading: ReadingIn) -> dict[str, Any]:
    try:
        await _store(reading)
    except IntegrityError:
        # Two requests created the same new device or metric at once: the second retries.
        try:
            await _store(reading)
        except IntegrityError as exc:
            raise HTTPException(409, "duplicate reading") from exc
    return {"accepted": 1}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
