"""InfluxDB line protocol: parsing, and the mapping of points to readings.

`measurement,tag=v,... field=value,... [timestamp]`, one point a line. The device id is the tag
named by `VITALSTORE_LP_DEVICE_TAG`; each numeric field is a metric named by its key; string and
boolean fields, the other tags and the measurement (`_measurement`, InfluxDB's own name for it)
are attributes. The points then go through the JSON route's Validator, so the same rules hold.

Written here rather than taken from PyPI: line-protocol-parser 2.0.1 (C) took 35 us a line of
4 fields here, against about 6 us for this parser, and it keeps the first of duplicate fields
without a word.
"""

from __future__ import annotations

import re
from typing import Any

from vitalstore.database import EPOCH_UNIX_S
from vitalstore.problems import InvalidItems, Problem, TooManyReadings
from vitalstore.readings import Reading, Validator

MAX_REPORTED_LINES = 100
# A timestamp at each `precision` as (multiplier, divisor) to microseconds: integer arithmetic,
# since a float would lose nanoseconds. Finer digits than microseconds are dropped.
Precision = tuple[int, int]
PRECISION_V2: dict[str, Precision] = {"ns": (1, 1000), "us": (1, 1), "ms": (1000, 1),
                                      "s": (1_000_000, 1)}
PRECISION_V1: dict[str, Precision] = {"n": (1, 1000), "u": (1, 1), "ms": (1000, 1),
                                      "s": (1_000_000, 1), "m": (60_000_000, 1),
                                      "h": (3_600_000_000, 1)}
MEASUREMENT_KEY = "_measurement"

# InfluxDB's number syntax: no NaN, no infinities, no hex, no underscores.
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_UNSIGNED = re.compile(r"\d+")
_BOOLEANS = {"t": True, "T": True, "true": True, "True": True, "TRUE": True,
             "f": False, "F": False, "false": False, "False": False, "FALSE": False}
_RESERVED = ("device", "timestamp")
_DIGITS = frozenset("0123456789.")
_INT64 = 2**63
_MAX_UNIX_US = 10**11 * 1_000_000  # year 5138: surely a wrong precision


class LineErrors(Problem):
    """Lines that cannot be stored: 400, naming each line (up to MAX_REPORTED_LINES)."""

    status = 400

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        self.errors = errors[:MAX_REPORTED_LINES]
        listed = "\n".join(f"line {number}: {message}" for number, message in self.errors)
        super().__init__(f"failed to parse line protocol: errors encountered on line(s):\n"
                         f"{listed}")


class _BadLine(ValueError):
    pass


def _split(text: str, separator: str, quotes: bool = False) -> list[str]:
    """Split on `separator` where it is neither escaped by a backslash nor inside quotes."""
    parts: list[str] = []
    start = 0
    index = 0
    quoted = False
    length = len(text)
    while index < length:
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if quotes and char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    if quoted:
        raise _BadLine("unterminated string field value")
    parts.append(text[start:])
    return parts


def _unescape(text: str) -> str:
    """Keys, tag values and measurements: `\\,`, `\\=`, `\\ ` and `\\\\` stand for the char."""
    if "\\" not in text:
        return text
    return re.sub(r"\\([,= \\])", r"\1", text)


def _sections(line: str) -> tuple[str, str, str]:
    """(measurement and tags, fields, timestamp) of a line with escapes or quotes."""
    parts = _split(line, " ", quotes=True)
    if len(parts) == 2:
        return parts[0], parts[1], ""
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    raise _BadLine("expected 'measurement[,tags] fields [timestamp]' separated by single spaces")


def _key_value(pair: str, what: str) -> tuple[str, str]:
    parts = _split(pair, "=") if "\\" in pair else pair.split("=")
    if len(parts) < 2 or not parts[0]:
        raise _BadLine(f"missing {what} key" if pair.startswith("=") else
                       f"{what} {pair[:80]!r} needs key=value")
    if what == "tag" and len(parts) > 2:
        raise _BadLine(f"tag {pair[:80]!r}: unescaped '=' in its value")
    return _unescape(parts[0]), "=".join(parts[1:])


def _field_value(raw: str, key: str) -> Any:
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise _BadLine(f"field {key!r}: unterminated string")
        inner = raw[1:-1]
        return inner.replace('\\"', '"').replace("\\\\", "\\") if "\\" in inner else inner
    if raw in _BOOLEANS:
        return _BOOLEANS[raw]
    last = raw[-1:]
    if last == "i" and _INTEGER.fullmatch(raw, 0, len(raw) - 1):
        integer = int(raw[:-1])
        if -_INT64 <= integer < _INT64:
            return integer
        raise _BadLine(f"field {key!r}: integer out of the 64-bit range")
    if last == "u" and _UNSIGNED.fullmatch(raw, 0, len(raw) - 1):
        integer = int(raw[:-1])
        if integer < 2 * _INT64:
            return integer
        raise _BadLine(f"field {key!r}: unsigned integer out of the 64-bit range")
    if _FLOAT.fullmatch(raw):
        return float(raw)
    raise _BadLine(f"field {key!r}: invalid value {raw[:80]!r} (numbers are finite decimals, "
                   "integers end in 'i', unsigned in 'u'; strings are double-quoted)")


class LineParser:
    """Turns a line-protocol body into validated Readings, all of them or none."""

    def __init__(self, validator: Validator, device_tag: str) -> None:
        self.validator = validator
        self.device_tag = device_tag

    def parse(self, body: bytes, precision: Precision, arrival_s: float) -> list[Reading]:
        """Raises LineErrors (400) or TooManyReadings (413); `arrival_s` stamps untimed lines."""
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            raise LineErrors([(body.count(b"\n", 0, exc.start) + 1, "not UTF-8")]) from None
        items: list[dict[str, Any]] = []
        times: list[int] = []
        numbers: list[int] = []
        errors: list[tuple[int, str]] = []
        arrival_us = round(arrival_s * 1_000_000)
        max_items = self.validator.max_items
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.strip(" \t\r")
            if not line or line.startswith("#"):
                continue
            if len(items) + len(errors) >= max_items:
                raise TooManyReadings(f"more than {max_items} lines in one request")
            try:
                item, unix_us = self._point(line, precision)
            except _BadLine as exc:
                errors.append((number, str(exc)))
                if len(errors) >= MAX_REPORTED_LINES:
                    break
                continue
            items.append(item)
            times.append(arrival_us if unix_us is None else unix_us)
            numbers.append(number)
        if errors:
            raise LineErrors(errors)
        for item, unix_us in zip(items, times, strict=True):
            # Whole seconds for the Validator's bounds; the exact time is set afterwards.
            item["timestamp"] = unix_us // 1_000_000
        try:
            readings = self.validator.validate(items)
        except InvalidItems as exc:
            raise LineErrors([(numbers[e.index], _explain(e.field, e.message))
                              for e in exc.errors]) from None
        epoch_us = EPOCH_UNIX_S * 1_000_000
        return [Reading(reading.device, unix_us - epoch_us, reading.metrics, reading.attributes)
                for reading, unix_us in zip(readings, times, strict=True)]

    def _point(self, line: str, precision: Precision) -> tuple[dict[str, Any], int | None]:
        """One line as a reading item, and its time in Unix microseconds (None: untimed)."""
        plain = "\\" not in line and '"' not in line
        if plain:
            parts = line.split(" ")
            if len(parts) == 2:
                parts.append("")
            elif len(parts) != 3:
                raise _BadLine("expected 'measurement[,tags] fields [timestamp]' separated by "
                               "single spaces")
            head, fields, stamp = parts
            tag_pairs = head.split(",")
            field_pairs = fields.split(",")
        else:
            head, fields, stamp = _sections(line)
            tag_pairs = _split(head, ",")
            field_pairs = _split(fields, ",", quotes=True)
        measurement = _unescape(tag_pairs[0])
        if not measurement:
            raise _BadLine("missing measurement")
        if not fields:
            raise _BadLine("missing fields")
        item: dict[str, Any] = {MEASUREMENT_KEY: measurement}
        device = None
        put = self._put
        for pair in tag_pairs[1:]:
            if plain:
                key, _, value = pair.partition("=")
                if not key or "=" in value:
                    key, value = _key_value(pair, "tag")  # raises, saying what is wrong
            else:
                key, value = _key_value(pair, "tag")
                value = _unescape(value)
            if not value:
                raise _BadLine(f"tag {key!r} has no value")
            if key == self.device_tag:
                device = value
            else:
                put(item, key, value)
        if device is None:
            raise _BadLine(f"missing the device tag {self.device_tag!r}")
        for pair in field_pairs:
            # The common case inline (a plain key and a decimal number): 3x faster per line.
            key, _, raw = pair.partition("=")
            if plain and key and raw[-1:] in _DIGITS and "=" not in raw and "_" not in raw \
                    and key not in item and key not in _RESERVED:
                try:
                    item[key] = float(raw)
                    continue
                except ValueError:
                    pass
            key, raw = _key_value(pair, "field")
            put(item, key, _field_value(raw, key))
        item["device"] = device
        if not stamp:
            return item, None
        if not (stamp.isascii() and stamp.isdigit()) and not _INTEGER.fullmatch(stamp):
            raise _BadLine(f"invalid timestamp {stamp[:40]!r} (an integer at the precision)")
        multiplier, divisor = precision
        unix_us = int(stamp) * multiplier // divisor
        if unix_us >= _MAX_UNIX_US:
            raise _BadLine(f"timestamp {stamp[:40]} is far in the future: is `precision` right?")
        return item, unix_us

    @staticmethod
    def _put(item: dict[str, Any], key: str, value: Any) -> None:
        if key in item:
            raise _BadLine(f"key {key!r} appears twice")
        if key in _RESERVED:
            raise _BadLine(f"key {key!r} is reserved (vitalstore's own field); rename it")
        item[key] = value


def _explain(field: str, message: str) -> str:
    if field == "timestamp" and "before 2000" in message:
        message += ": is `precision` right?"
    return f"{field}: {message}" if field else message
