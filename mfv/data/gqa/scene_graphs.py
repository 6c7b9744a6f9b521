"""GQA scene-graph files read as a stream: one image entry at a time, in bounded memory
(GQA's full train file is ~75k images, hundreds of MB)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, TextIO

from mfv.errors import DataError


class _JsonObjectReader:
    """A cursor over a JSON text read ``chunk_size`` characters at a time.

    Only the unread tail of the text is kept in memory, so a file of hundreds of MB is
    walked in bounded memory; values are decoded one at a time with ``raw_decode``.

    Attributes:
        buffer: The text read and not yet consumed (from ``position`` on).
        position: Index of the next unread character in ``buffer``.
        eof: Whether the file has been read to its end.
    """

    def __init__(self, handle: TextIO, path: Path, chunk_size: int) -> None:
        self._handle = handle
        self._path = path
        self._chunk_size = chunk_size
        self._decoder = json.JSONDecoder()
        self.buffer = handle.read(chunk_size)
        self.position = 0
        self.eof = False

    def _ensure(self, n: int) -> None:
        """Reads on until ``n`` unread characters are buffered or the file ends."""
        while not self.eof and len(self.buffer) - self.position < n:
            more = self._handle.read(self._chunk_size)
            if not more:
                self.eof = True
                break
            self.buffer = self.buffer[self.position:] + more
            self.position = 0

    def peek(self) -> str | None:
        """The next unread character, or ``None`` at the end of the buffered text."""
        return self.buffer[self.position] if self.position < len(self.buffer) else None

    def skip_space(self) -> None:
        """Skips whitespace and commas (the separators between entries), reading on as needed."""
        while True:
            self._ensure(1)
            while self.position < len(self.buffer) and self.buffer[self.position] in " \t\r\n,":
                self.position += 1
            if self.position < len(self.buffer) or self.eof:
                return

    def expect(self, char: str, problem: str) -> None:
        """Consumes ``char``.

        Raises:
            DataError: the next character is not ``char``; the message is ``problem``.
        """
        if self.peek() != char:
            raise DataError(f"{self._path}: {problem}")
        self.position += 1

    def decode(self) -> Any:
        """Decodes the next JSON value, reading more text until it is whole.

        Raises:
            DataError: the value is malformed (or cut off by the end of the file).
        """
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buffer, self.position)
                # A number or literal may be cut at the buffer's end: make sure it is whole.
                if end == len(self.buffer) and not self.eof:
                    raise json.JSONDecodeError("partial", self.buffer, end)
                self.position = end
                return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise DataError(f"{self._path}: malformed JSON near character {exc.pos}: {exc.msg}") from exc
                more = self._handle.read(self._chunk_size)
                if not more:
                    self.eof = True
                self.buffer = self.buffer[self.position:] + more
                self.position = 0


def iter_scene_graphs(path: str | Path, chunk_size: int = 1 << 22) -> Iterator[tuple[str, Any]]:
    """Streams ``(image_id, entry)`` pairs of a top-level JSON object without loading it whole.

    Args:
        path: A GQA scene-graph file (a JSON object keyed by image id).
        chunk_size: Characters read at a time.

    Raises:
        DataError: the file is missing, not a JSON object, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"scene-graph file {path} not found")
    with path.open("r", encoding="utf-8") as handle:
        reader = _JsonObjectReader(handle, path, chunk_size)
        reader.skip_space()
        reader.expect("{", "expected a JSON object of scene graphs keyed by image id")
        while True:
            reader.skip_space()
            if reader.peek() == "}":
                return
            key = reader.decode()
            reader.skip_space()
            reader.expect(":", f"malformed JSON after key {key!r}")
            reader.skip_space()
            yield str(key), reader.decode()
