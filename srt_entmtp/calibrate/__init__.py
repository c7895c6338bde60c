"""Calibration: acceptance statistics, cost curves, tree search, validation (`entmtp calibrate`)."""
from __future__ import annotations

import json
from pathlib import Path


class CalibrationFileError(ValueError):
    """A calibration file is unreadable or invalid; the message names the file and the field."""

    def __init__(self, source: str, where: str, message: str):
        self.source, self.where = source, where
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def read_json(path, error: type[CalibrationFileError]):
    """The parsed file; an unreadable file or bad JSON raises `error` naming the file."""
    src = str(path)
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise error(src, "", f"cannot read file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise error(src, "", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
