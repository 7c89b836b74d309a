"""Append-only JSONL log of attempts: written one fsynced line at a time, tolerant of a torn last line."""
from __future__ import annotations

import json
import os
from pathlib import Path


class AttemptLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[tuple[str, int], dict]:
        """Records by (problem, sample). A partial last line (killed mid-write) is cut off so the unit reruns."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end < len(raw):
            with self.path.open("r+b") as f:
                f.truncate(good_end)
        records: dict[tuple[str, int], dict] = {}
        for lineno, line in enumerate(raw[:good_end].split(b"\n"), 1):  # not splitlines: U+2028 is text
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                key = (rec["problem"], int(rec["sample"]))
            except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError too
                raise ValueError(f"{self.path}:{lineno}: corrupt attempt record ({e}); fix or move the file") from e
            if key in records:
                raise ValueError(f"{self.path}:{lineno}: duplicate attempt {key}")
            records[key] = rec
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
