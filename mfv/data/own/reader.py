"""Reads your own relation data: a folder of images and one JSONL or CSV file of examples.

One example per JSONL line (a JSON object) or CSV row (with a header line)::

    {"image": "kitchen/0001.jpg", "query": "cup", "answer": "saucer", "relation": "on top of"}

Fields:

* ``image``: the image file, relative to the folder and inside it (a path that leaves it, by
  ``..`` or a link pointing out, is refused before anything is opened). One image per example:
  the prompt builder shows one image per demonstration and one for the query (a list is refused).
* ``query``: the text after ``Q:`` (usually an object's name).
* ``answer``: the text after ``A:`` (the object's name the relation leads to); scored on its
  first token, as the authors do.
* ``relation`` (or ``task``): the relation's name; never shown to the model.
* ``split`` (optional, every example or none): ``train``, ``val``, ``test``, ``eval`` or ``novel``.

Other fields are ignored. The file may be UTF-8 with a byte-order mark and CRLF line ends (as
spreadsheets save it); a CSV may be separated by commas, semicolons or tabs. Bad input stops
with one :class:`~mfv.errors.DataError` line naming the file, the line and the field, before
any model work.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from mfv.errors import DataError

REQUIRED = ("image", "query", "answer", "relation")
SPLITS = ("train", "val", "test", "eval", "novel")
FORMATS = (".jsonl", ".csv")


@dataclass(frozen=True)
class OwnExample:
    """One example of your data, checked.

    Attributes:
        image_path: The image file (the folder joined with the ``image`` field).
        query: Text after ``Q:``.
        answer: Text after ``A:``.
        relation: The relation's name.
        split: The ``split`` field, or ``None`` when the file has none.
        line: Where the example starts in its file (1-based; a CSV's header is line 1).
    """

    image_path: str
    query: str
    answer: str
    relation: str
    split: str | None
    line: int


def _rows(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, row)`` of a JSONL or CSV file; a row is a dict (or, for bad JSONL, anything).

    Both are read as a spreadsheet or an editor saves them: UTF-8 with or without a byte-order
    mark, LF or CRLF line ends, blank lines (and a CSV's rows of empty cells) skipped, and a CSV
    separated by commas, semicolons or tabs (told apart by its header line).
    """
    try:
        yield from (_jsonl_rows if path.suffix.lower() == ".jsonl" else _csv_rows)(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as "
                        f"UTF-8 (a spreadsheet's 'CSV UTF-8')") from exc


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a leading byte-order mark is not data
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue  # blank lines (a trailing newline, spacing) are not examples
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not a JSON object ({exc.msg} at column {exc.colno})") from exc


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    # newline="": the csv module itself reads CRLF and line breaks inside quoted fields.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = handle.readline()
        handle.seek(0)
        separator = max(",;\t", key=header.count)  # field names hold none of them
        reader = csv.DictReader(handle, delimiter=separator)
        reader.fieldnames = columns = [name.strip() for name in reader.fieldnames or []]  # "image, query, ..."
        missing = [f for f in REQUIRED if f not in columns and not (f == "relation" and "task" in columns)]
        if missing:
            raise DataError(f"{path}:1: field {missing[0]!r}: no such column in the header (columns: {columns}; "
                            f"needed: {list(REQUIRED)})")
        start = 2
        for row in reader:
            if any(str(v or "").strip() for v in row.values()):  # a spreadsheet's trailing empty rows
                yield start, row
            start = reader.line_num + 1  # a quoted field may span several lines


def _text(path: Path, line: int, row: dict, field: str) -> str:
    """The field's value as stripped, non-empty, one-line text."""
    value = row.get(field)
    if field == "relation" and "task" in row:
        if value is not None and row["task"] not in (None, "") and value != row["task"]:
            raise DataError(f"{path}:{line}: fields 'relation' and 'task' differ ({value!r}, {row['task']!r}); "
                            f"give one of them")
        value = value if value not in (None, "") else row["task"]
    if value is None:
        raise DataError(f"{path}:{line}: field {field!r} missing (needed: {list(REQUIRED)}; 'task' may stand for "
                        f"'relation')")
    if field == "image" and isinstance(value, list):
        raise DataError(f"{path}:{line}: field 'image' is a list of {len(value)}; one image per example (the prompt "
                        f"builder shows one image per demonstration and one for the query)")
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {field!r} must be text, got {value!r} ({type(value).__name__}); "
                        f"quote it")
    text = " ".join(value.split())
    if not text:
        raise DataError(f"{path}:{line}: field {field!r} is empty")
    if field != "image" and "\n" in value.strip():
        raise DataError(f"{path}:{line}: field {field!r} has a line break; prompts hold one line per example")
    return text if field != "image" else value.strip()


def _image(root: Path, path: Path, line: int, name: str, seen: dict[str, str | None]) -> str:
    """The image file of field ``image`` (relative to ``root``), checked once per file to stay
    inside ``root`` (resolved, links followed: nothing outside the data folder is ever opened)
    and to exist."""
    if Path(name).is_absolute():
        raise DataError(f"{path}:{line}: field 'image': {name} is absolute; give the path relative to {root}")
    full = str(root / name)
    if full not in seen:
        seen[full] = _image_problem(root, Path(full))
    if seen[full]:
        shown = name if len(name) <= 200 else name[:160] + "..."
        raise DataError(f"{path}:{line}: field 'image': {shown} {seen[full]}")
    return full


def _image_problem(root: Path, full: Path) -> str | None:
    """Why ``full`` cannot be an image of ``root`` (it leaves the folder, or is no file), or ``None``."""
    try:
        target, is_file = full.resolve(), full.is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a name too long, a link loop
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)[:80]
        return f"is not a usable path ({why}); give the image's path relative to {root}"
    if not target.is_relative_to(root.resolve()):
        # Written inside the folder yet resolving outside it: a link on the way points out.
        written = Path(os.path.abspath(full)).is_relative_to(os.path.abspath(root))
        via = f"{'a link on its path points to' if written else 'it resolves to'} {target}"
        return (f"leaves the data folder {root} ({via}); image paths must stay inside it: copy the image into "
                f"{root} and give its path relative to it")
    if not is_file:
        return f"not found in {root}"
    return None


def _split(path: Path, line: int, row: dict, has_split: bool | None, first: int) -> str | None:
    """The ``split`` field; every example has one or none does (``has_split`` from the first example)."""
    present = row.get("split") is not None
    if has_split is not None and present != has_split:
        say = "has a 'split'" if has_split else "has none"
        raise DataError(f"{path}:{line}: field 'split' {'missing' if has_split else 'given'} while line {first} "
                        f"{say}; give every example a split, or none")
    if not present:
        return None
    value = _text(path, line, row, "split")
    if value not in SPLITS:
        raise DataError(f"{path}:{line}: field 'split' is {value!r}; valid: {list(SPLITS)}")
    return value


def read_examples(annotations: str | Path, root: str | Path) -> list[OwnExample]:
    """Every example of ``annotations`` (JSONL or CSV), checked against the image folder ``root``.

    Args:
        annotations: The JSONL or CSV file (format: module docstring).
        root: The image folder the ``image`` fields are relative to.

    Raises:
        DataError: one line naming the file, the line and the field: a missing or empty
            field, an image file not found or outside ``root``, a bad split, a duplicate example (same image, query
            and relation), no example at all, or a file that is missing or of another format.
    """
    path, root = Path(annotations), Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found (data.init_args.data_dir; in a config file, a relative "
                        "path is read from the config's folder)")
    if not path.is_file():
        raise DataError(f"{path}: examples file not found (data.init_args.annotations)")
    if path.suffix.lower() not in FORMATS:
        raise DataError(f"{path}: examples file must be {' or '.join(FORMATS)} (one example per line or row)")
    examples: list[OwnExample] = []
    first_of: dict[tuple[str, str, str], int] = {}
    images: dict[str, str | None] = {}
    has_split: bool | None = None
    for line, row in _rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: not a JSON object (got {type(row).__name__}); one example per line")
        fields = {f: _text(path, line, row, f) for f in REQUIRED}
        image = _image(root, path, line, fields["image"], images)
        split = _split(path, line, row, has_split, examples[0].line if examples else line)
        has_split = split is not None
        key = (image, fields["query"], fields["relation"])
        if key in first_of:
            raise DataError(f"{path}:{line}: fields 'image', 'query', 'relation' repeat line {first_of[key]} "
                            f"({fields['image']}, {fields['query']!r}, {fields['relation']!r}); keep one")
        first_of[key] = line
        examples.append(OwnExample(image, fields["query"], fields["answer"], fields["relation"], split, line))
    if not examples:
        raise DataError(f"{path}: no examples (one per line or row, with fields {list(REQUIRED)})")
    return examples


def select_relations(examples: Sequence[OwnExample], relations: Sequence[str] | None, path: str | Path) -> list[str]:
    """The relations asked for, checked against the file (default: the file's, in order of first use).

    Raises:
        DataError: a name no example has (naming the file, the config field and the file's names).
    """
    present = list(dict.fromkeys(e.relation for e in examples))
    if relations is None:
        return present
    chosen = [" ".join(str(r).split()) for r in relations]
    for name in chosen:
        if name not in present:
            raise DataError(f"{path}: data.init_args.relations has {name!r}, which no example has in field "
                            f"'relation'; the file has {present}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise DataError(f"{path}: data.init_args.relations must be a non-empty list of distinct names, got {chosen}")
    return chosen
