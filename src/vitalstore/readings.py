"""Wire format of readings: decoding, validation, and time conversions.

A reading is a JSON object with `device`, `timestamp`, any number of numeric fields (metrics)
and any other fields (attributes). Decoding is one msgspec pass into plain dicts followed by one
validation pass; nothing here touches the database.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Container
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import msgspec

from vitalstore.database import EPOCH_UNIX_S
from vitalstore.problems import InvalidItems, ItemError, MalformedBody, TooManyReadings

# A Unix time in seconds above this (year 5138) is certainly milliseconds or finer.
_MILLISECONDS_HINT = 100_000_000_000

MAX_DEVICE_CHARS = 128
# A string that is a JSON number in full: what a metric sent as a string may hold. "1.2.3"
# (a firmware version) and "007" (an id) are not numbers and stay attributes.
NUMERIC_STRING = re.compile(r"\s*-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\s*")
METRIC_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_REPORTED_ERRORS = 100
# Attributes are small records, not documents; this also keeps every later recursive step
# (re-encoding, PostgreSQL's jsonb) far from its own limits.
MAX_ATTRIBUTE_DEPTH = 32

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class Reading(NamedTuple):
    """One validated reading."""

    device: str
    ts_us: int  # microseconds since 2000-01-01 UTC
    metrics: list[tuple[str, float]]
    attributes: bytes | None  # the JSON object of non-numeric fields, encoded; None when empty


class _DuplicateKey(Exception):
    pass


def unix_to_pg_us(seconds: float) -> int:
    """Unix seconds (int or float) to microseconds since 2000-01-01."""
    if isinstance(seconds, int):
        return (seconds - EPOCH_UNIX_S) * 1_000_000
    return round(seconds * 1_000_000) - EPOCH_UNIX_S * 1_000_000


def datetime_to_rfc3339(moment: datetime) -> str:
    """An aware datetime to the RFC 3339 UTC form used in every response."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def storable(text: str) -> bool:
    """Text PostgreSQL can take: no U+0000 and no unpaired surrogate (not valid UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_time(text: str) -> datetime:
    """A query time: RFC 3339 (any offset) or Unix seconds. Raises ValueError."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"not a time: {text!r}")
        if abs(seconds) >= _MILLISECONDS_HINT:
            raise ValueError(f"{text!r} looks like milliseconds (or finer); send Unix seconds,"
                             " e.g. 1750240800.25")
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise ValueError(f"time out of range: {text!r}") from exc
    if "T" not in text and "t" not in text and " " not in text:
        raise ValueError(f"not an RFC 3339 time or Unix seconds: {text!r}")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 time or Unix seconds: {text!r}") from exc
    if moment.tzinfo is None:
        raise ValueError(f"time needs a UTC offset (Z or +hh:mm): {text!r}")
    try:
        # In UTC from here on: later arithmetic cannot overflow at year 1 or 9999.
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"time out of range: {text!r}") from None


def _timestamp_seconds(value: Any) -> float:
    """The `timestamp` field as Unix seconds; raises ValueError with a client-facing message."""
    if isinstance(value, bool):
        raise ValueError("must be Unix seconds or an RFC 3339 string")
    if isinstance(value, int | float):
        # An int of any size compares exactly; math.isfinite would convert it to a float.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value < 0:
            raise ValueError("must not be before 2000-01-01")
        if value >= _MILLISECONDS_HINT:
            raise ValueError(
                "looks like milliseconds (or finer); send Unix seconds, e.g. 1750240800.25"
            )
        return value
    if isinstance(value, str):
        if len(value) > 64:
            raise ValueError("must be Unix seconds or an RFC 3339 string")
        return parse_time(value).timestamp()
    raise ValueError("must be Unix seconds or an RFC 3339 string")


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return "a string" if isinstance(value, str) else f"a JSON {type(value).__name__}"


class Validator:
    """Validates decoded items into Readings under the service's limits.

    `retention_raw` (None: forever) refuses readings that the next retention run would delete.
    """

    def __init__(self, *, max_items: int, max_future_skew_s: float,
                 retention_raw: timedelta | None = None, retention_setting: str = "") -> None:
        self.max_items = max_items
        self.max_future_skew_s = max_future_skew_s
        self.retention_s = None if retention_raw is None else retention_raw.total_seconds()
        self.retention_setting = retention_setting

    def decode(self, body: bytes, content_type: str, device: str | None = None,
               known_metrics: Container[str] = frozenset()) -> list[Reading]:
        """Decode and validate a request body.

        Raises MalformedBody, TooManyReadings or InvalidItems. `device` is the device of
        items that name none (MQTT: the device of the topic). A field named in
        `known_metrics` must hold a number, or a string that is one.
        """
        if not body or body.isspace():
            raise MalformedBody("the body is empty: send a reading object, an array of them,"
                                " or one reading per line (application/x-ndjson)")
        ndjson = content_type == "application/x-ndjson"
        items = self._decode_ndjson(body) if ndjson else self._decode_json(body)
        injected = 0
        if device is not None:
            for item in items:
                if isinstance(item, dict) and "device" not in item:
                    item["device"] = device
                    injected += 1
        readings, pairs = self._validate(items, known_metrics)
        # An injected device's key and colons are not in the body.
        if device is not None:
            pairs -= injected * (1 + device.count(":"))
        if pairs != _raw_pairs(body):
            _refuse_duplicate_keys(body, ndjson)
        return readings

    def _decode_json(self, body: bytes) -> list[Any]:
        try:
            decoded = _decoder.decode(body)
        except msgspec.DecodeError as exc:
            hint = ""
            if "trailing characters" in str(exc) and b"\n" in body.strip():
                hint = ("; for one reading per line send Content-Type: application/x-ndjson,"
                        " or wrap the readings in a JSON array")
            raise MalformedBody(f"malformed JSON: {exc}{hint}") from None
        except RecursionError:
            raise MalformedBody("malformed JSON: nested too deeply") from None
        if isinstance(decoded, dict):
            return [decoded]
        if isinstance(decoded, list):
            if len(decoded) > self.max_items:
                raise TooManyReadings(
                    f"{len(decoded)} readings; at most {self.max_items} per request")
            return decoded
        raise MalformedBody("the body must be a reading object or an array of reading objects")

    def _decode_ndjson(self, body: bytes) -> list[Any]:
        items: list[Any] = []
        for number, line in enumerate(body.split(b"\n"), start=1):
            if not line.strip():
                continue
            if len(items) >= self.max_items:
                raise TooManyReadings(f"more than {self.max_items} readings in one request")
            try:
                items.append(_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise MalformedBody(f"malformed JSON on line {number}: {exc}") from None
            except RecursionError:
                raise MalformedBody(f"malformed JSON on line {number}: nested too deeply"
                                    ) from None
        return items

    def validate(self, items: list[Any]) -> list[Reading]:
        """Check decoded items (line protocol's points); all valid, or InvalidItems."""
        return self._validate(items, frozenset())[0]

    def _validate(self, items: list[Any], known_metrics: Container[str]
                  ) -> tuple[list[Reading], int]:
        """The readings, and the count `_raw_pairs` gives for their JSON if no key repeats."""
        readings: list[Reading] = []
        errors: list[ItemError] = []
        pairs = 0
        now = time.time()
        window = (EPOCH_UNIX_S if self.retention_s is None
                  else max(EPOCH_UNIX_S, now - self.retention_s), now + self.max_future_skew_s)
        for index, item in enumerate(items):
            reading = self._validate_item(index, item, window, known_metrics, errors)
            if reading is not None:
                readings.append(reading)
                # Keys of device, timestamp and metrics, and every colon of the device, of a
                # string timestamp and of the re-encoded attributes (pairs and strings alike);
                # valid metric names and numbers hold none.
                pairs += 2 + len(reading.metrics) + reading.device.count(":")
                timestamp = item["timestamp"]
                if isinstance(timestamp, str):
                    pairs += timestamp.count(":")
                if reading.attributes is not None:
                    pairs += reading.attributes.count(b":")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        if errors:
            raise InvalidItems(errors[:MAX_REPORTED_ERRORS])
        return readings, pairs

    def _validate_item(
        self, index: int, item: Any, window: tuple[float, float],
        known_metrics: Container[str], errors: list[ItemError]
    ) -> Reading | None:
        if not isinstance(item, dict):
            errors.append(ItemError(index, "", "a reading must be a JSON object"))
            return None
        failed = len(errors)

        device = item.get("device")
        if not isinstance(device, str):
            errors.append(ItemError(index, "device", "required, a string"))
        elif not 1 <= len(device) <= MAX_DEVICE_CHARS:
            errors.append(ItemError(index, "device", "must be 1 to 128 characters"))
        elif "/" in device or device in (".", ".."):
            # Clients resolve "." and ".." in a URL path before sending it.
            errors.append(ItemError(index, "device", "must not contain '/' nor be '.' or '..':"
                                    " a device id is one segment of its URLs"
                                    " (/v1/devices/{device}/latest)"))
        elif not device.isprintable():
            errors.append(
                ItemError(index, "device", "must hold printable characters only "
                          "(no control, format, zero-width or line-separator characters)")
            )

        ts_us = 0
        if "timestamp" not in item:
            errors.append(ItemError(index, "timestamp", "required"))
        else:
            try:
                seconds = _timestamp_seconds(item["timestamp"])
            except ValueError as exc:
                errors.append(ItemError(index, "timestamp", str(exc)))
            else:
                if seconds < EPOCH_UNIX_S:
                    errors.append(ItemError(index, "timestamp", "must not be before 2000-01-01"))
                elif seconds < window[0]:
                    errors.append(ItemError(
                        index, "timestamp",
                        f"is older than the raw retention horizon {_rfc3339(window[0])}"
                        f" (VITALSTORE_RETENTION_RAW={self.retention_setting}): the next"
                        " retention run would delete it",
                    ))
                elif seconds > window[1]:
                    errors.append(ItemError(
                        index, "timestamp",
                        f"is more than {self.max_future_skew_s:g} s in the future",
                    ))
                else:
                    ts_us = unix_to_pg_us(seconds)

        metrics: list[tuple[str, float]] = []
        attributes: dict[str, Any] | None = None
        for name, value in item.items():
            if name == "device" or name == "timestamp":
                continue
            if type(value) is not int and type(value) is not float and name in known_metrics:
                # A known metric's value sent as a string is stored as the number it is;
                # anything else in its place would silently become an attribute.
                if isinstance(value, str) and NUMERIC_STRING.fullmatch(value):
                    value = float(value)
                else:
                    errors.append(ItemError(
                        index, name, f"is a metric: send a number, not {_json_kind(value)}"
                        + (" (leave the field out when there is no value)"
                           if value is None else "")))
                    continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not METRIC_NAME.fullmatch(name):
                    errors.append(ItemError(
                        index, name[:80],
                        "metric names are 1 to 64 letters, digits, '_', '.' or '-'",
                    ))
                    continue
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if not math.isfinite(number):
                    errors.append(ItemError(index, name, "must be a finite number"))
                    continue
                metrics.append((name, number + 0.0))  # + 0.0 turns -0.0 into 0.0
            else:
                if isinstance(value, dict | list) and _too_deep(value, MAX_ATTRIBUTE_DEPTH):
                    errors.append(ItemError(index, name[:80], f"nests deeper than "
                                                              f"{MAX_ATTRIBUTE_DEPTH} levels"))
                    continue
                if attributes is None:
                    attributes = {}
                attributes[name] = value

        if len(errors) > failed:
            return None
        if not metrics and not attributes:
            errors.append(ItemError(index, "", "a reading needs at least one metric (a number)"
                                    " or attribute besides device and timestamp"))
            return None
        encoded = None
        if attributes:
            encoded = _encoder.encode(attributes)
            # PostgreSQL's jsonb cannot hold U+0000; refuse it here rather than fail a flush.
            if b"\\u0000" in encoded:
                errors.append(ItemError(index, "", "attributes must not contain U+0000"))
                return None
        return Reading(device, ts_us, metrics, encoded)  # type: ignore[arg-type]


# Duplicate keys: msgspec keeps the last value of a repeated key without a word, which would
# store something other than what was sent. Finding them exactly needs a second parse, too
# dear for every request, so a count decides when to look. In JSON text a colon outside a
# string separates one key from its value; inside a string it is written `:` or `\u003a`.
# Counting the colons and `\u003a`s of the body gives at least the decoded key-value pairs
# plus the colons of the decoded strings (more when a backslash is itself escaped), and
# exactly that when no key repeats; a repeated key's pair (and its value's colons) is missing
# from the decoded side. Equal counts (nearly always) prove there is none. Only a body whose
# counts differ is parsed again to find out.

def _raw_pairs(body: bytes) -> int:
    return body.count(b":") + body.count(b"\\u003a") + body.count(b"\\u003A")


def _too_deep(value: dict[str, Any] | list[Any], levels: int) -> bool:
    if levels == 0:
        return True
    for child in value.values() if isinstance(value, dict) else value:
        if (type(child) is dict or type(child) is list) and _too_deep(child, levels - 1):
            return True
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)


def _refuse_duplicate_keys(body: bytes, ndjson: bool) -> None:
    """Raises MalformedBody naming a key that repeats in one object, if there is one."""
    for number, text in enumerate(body.split(b"\n") if ndjson else [body], start=1):
        try:
            json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            where = f" on line {number}" if ndjson else ""
            raise MalformedBody(f"duplicate key {exc.args[0]!r} in a JSON object{where}"
                                ) from None
        except ValueError:
            pass  # blank NDJSON line; msgspec has already read everything else
