"""Guarded reading of the files a user hands the tool: one checked path from a name to bytes.

Every file nem-study reads (study and run YAML, data specs, checkpoints, MNIST, the data cache's
manifest) goes through :func:`check_file` and, for text, :func:`read_text`, so whatever is wrong
with it (missing, a directory, a FIFO, unreadable, empty, too large, not UTF-8, NUL bytes,
nested too deep, aliases that blow up) is one :class:`InputError` line naming the file, raised
before anything is parsed, allocated or written. The limits of a study / run YAML (README,
"Reliability"):

* UTF-8 text (a UTF-8 byte-order mark is accepted; UTF-16 / UTF-32 are refused with a hint);
* at most :data:`MAX_YAML_BYTES` (1 MiB), no NUL bytes, not empty;
* at most :data:`MAX_YAML_DEPTH` nested levels and :data:`MAX_YAML_NODES` values, counted with
  aliases expanded (``*name`` repeats what ``&name`` holds, so a "billion laughs" file is refused
  from its events, before anything is built); an alias may not refer to its own node;
* YAML 1.1 as PyYAML's ``safe_load`` reads it: plain data, no Python tags.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from nem_study.machine import available_memory

MAX_YAML_BYTES = 1 << 20       #: a study / run / data-spec YAML
MAX_YAML_DEPTH = 20            #: nested mappings / lists (a study needs 5)
MAX_YAML_NODES = 10_000        #: values, aliases expanded (a study has a few hundred)
MAX_JSON_BYTES = 16 << 20      #: a data set's manifest.json (a few kB)
MAX_CHECKPOINT_BYTES = 4 << 30  #: a checkpoint (these networks' are a few MB)


class InputError(Exception):
    """A problem with user input; the CLI prints it and exits with code 2.

    Importable as ``nem_study.config.InputError`` too (its historical home).
    """


def human(n: float, binary: bool = False) -> str:
    """Bytes as ``df -H`` prints them (``784 TB``, ``53.2 GB``), or in binary units (``1.0 MiB``)."""
    base, units = (1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")) if binary else \
        (1000, ("B", "kB", "MB", "GB", "TB", "PB", "EB"))
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= base
    raise AssertionError


def check_file(path: str | os.PathLike, what: str = "file") -> int:
    """``path`` must be an existing regular file; returns its size. Never opens it.

    A FIFO or a device is refused here, since reading one can block for ever or never end.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{p}: no such file") from None
    except PermissionError:
        raise InputError(f"{p}: cannot be read (permission denied)") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise InputError(f"{p}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{p}: not a regular file (a FIFO, socket or device); expected a {what}")
    return st.st_size


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_YAML_BYTES) -> bytes:
    """The bytes of a regular, non-empty file of at most ``limit`` bytes."""
    p = Path(path)
    size = check_file(p, what)
    if size > limit:
        raise InputError(f"{p}: too large for a {what} ({human(size, True)}; at most {human(limit, True)})")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)  # a file that grew since the stat
    except PermissionError:
        raise InputError(f"{p}: cannot be read (permission denied)") from None
    except OSError as e:
        raise InputError(f"{p}: cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise InputError(f"{p}: too large for a {what} (more than {human(limit, True)})")
    if not data.strip():
        raise InputError(f"{p}: empty ({'blank' if data else '0 bytes'}); expected a {what}")
    return data


_BOMS = [(b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
         (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16")]
_RESAVE = "save it as UTF-8 (e.g. `iconv -f {enc} -t UTF-8`, or your editor's \"UTF-8\" encoding)"


def decode_text(data: bytes, path: str | os.PathLike, what: str = "file") -> str:
    """UTF-8 text (an optional UTF-8 byte-order mark is dropped); anything else is an InputError."""
    for bom, enc in _BOMS:
        if data.startswith(bom):
            raise InputError(f"{path}: {enc} text, not UTF-8; {_RESAVE.format(enc=enc)}")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data:
        # UTF-16 without a byte-order mark: ASCII text with a NUL after (or before) every byte
        if len(data) >= 4 and (data[1::2].count(0) > 0.9 * (len(data) // 2) or
                               data[0::2].count(0) > 0.9 * (len(data) // 2)):
            raise InputError(f"{path}: looks like UTF-16 text, not UTF-8; {_RESAVE.format(enc='UTF-16')}")
        at = data.index(b"\x00")
        line = data.count(b"\n", 0, at) + 1
        raise InputError(f"{path}: contains NUL bytes (first at byte {at}, line {line}): binary data, "
                         f"not a text {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
                         f"binary data, or another encoding: {_RESAVE.format(enc='LATIN1')}") from None


def read_text(path: str | os.PathLike, what: str = "file", limit: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of a regular, non-empty file of at most ``limit`` bytes."""
    return decode_text(read_bytes(path, what, limit), path, what)


# ----------------------------------------------------------------------------------------
# YAML


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"


def _yaml_message(e: Exception) -> str:
    """A PyYAML error as one line: where, and what."""
    if isinstance(e, yaml.MarkedYAMLError):
        problem = (e.problem or str(e)).strip()
        context = f" ({e.context.strip()} at {_where(e.context_mark)})" if e.context and e.context_mark else ""
        return f"at {_where(e.problem_mark)}: {problem}{context}"
    if isinstance(e, yaml.reader.ReaderError):
        return f"at character {e.position}: unacceptable character #x{e.character:04x} (a control character)"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def check_yaml_structure(text: str, source: str) -> None:
    """Walk the YAML events (cheap; nothing is built) and refuse what would blow up later.

    Nesting deeper than :data:`MAX_YAML_DEPTH`, or more than :data:`MAX_YAML_NODES` values once
    every alias is replaced by what its anchor holds (exponential for a "billion laughs" file),
    or an alias inside its own anchor's node. Stops at the first such event, so the answer is
    immediate however bad the rest of the file is.
    """
    depth = nodes = 0
    expanded = False  # did aliases add values?
    frames: list[list[Any]] = []          # open collections: [anchor, nodes at start, depth, deepest]
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, levels)

    def too_deep(mark: Any, via: str = "") -> InputError:
        return InputError(f"{source}: nested more than {MAX_YAML_DEPTH} levels deep at {_where(mark)}{via}; "
                          f"a config needs a handful")

    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.AliasEvent):
            if ev.anchor not in anchors:
                if any(f[0] == ev.anchor for f in frames):
                    raise InputError(f"{source}: the alias *{ev.anchor} at {_where(ev.start_mark)} is inside "
                                     f"its own anchor &{ev.anchor} (a structure that contains itself)")
                continue  # an undefined alias: safe_load reports it
            values, levels = anchors[ev.anchor]
            nodes, expanded = nodes + values, True
            if depth + levels > MAX_YAML_DEPTH:
                raise too_deep(ev.start_mark, f" (through the alias *{ev.anchor})")
            if frames:
                frames[-1][3] = max(frames[-1][3], depth + levels)
        elif isinstance(ev, yaml.ScalarEvent):
            nodes += 1
            if ev.anchor:
                anchors[ev.anchor] = (1, 0)
        elif isinstance(ev, yaml.CollectionStartEvent):
            nodes, depth = nodes + 1, depth + 1
            if depth > MAX_YAML_DEPTH:
                raise too_deep(ev.start_mark)
            frames.append([ev.anchor, nodes - 1, depth, depth])
        elif isinstance(ev, yaml.CollectionEndEvent):
            anchor, start, at, deepest = frames.pop()
            depth -= 1
            if anchor:
                anchors[anchor] = (nodes - start, deepest - at + 1)
            if frames:
                frames[-1][3] = max(frames[-1][3], deepest)
        if nodes > MAX_YAML_NODES:
            how = " once its aliases (*name) are expanded" if expanded else ""
            raise InputError(f"{source}: more than {MAX_YAML_NODES:,} values{how} (at {_where(ev.start_mark)}); "
                             f"a config holds a few hundred")


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` of ``text`` after :func:`check_yaml_structure`; errors as one InputError line."""
    try:
        check_yaml_structure(text, source)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML {_yaml_message(e)}") from None
    except (ValueError, RecursionError) as e:
        why = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "integer string conversion" in why:
            why = f"an integer of more than {sys.get_int_max_str_digits():,} digits"
        raise InputError(f"{source}: a value cannot be read ({why})") from None


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    """The parsed content of a YAML file, every check of this module applied."""
    data = parse_yaml(read_text(path, what, MAX_YAML_BYTES), str(path))
    if data is None:
        raise InputError(f"{path}: no YAML content (only comments); write {{}} for all defaults")
    return data


# ----------------------------------------------------------------------------------------
# Binary files: checked before the library that reads them gets them


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """A checkpoint must be a regular, non-empty file of at most :data:`MAX_CHECKPOINT_BYTES`
    that starts like a zip archive (``torch.save`` writes one); torch then reads it."""
    size = check_file(path, "checkpoint")
    if size == 0:
        raise InputError(f"{path}: empty (0 bytes); expected a checkpoint (best.pt / last.pt)")
    if size > MAX_CHECKPOINT_BYTES:
        raise InputError(f"{path}: too large for a checkpoint ({human(size, True)}; at most "
                         f"{human(MAX_CHECKPOINT_BYTES, True)})")
    head = _head(path, 4)
    if head != b"PK\x03\x04":
        raise InputError(f"{path}: not a nem-study checkpoint (not a zip archive as torch.save writes; it "
                         f"starts with {head!r})")


def _head(path: str | os.PathLike, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None


def check_archive(path: str | os.PathLike, what: str, limit: int, hint: str = "") -> None:
    """A zip archive (an ``.npz``) whose members unpack to at most ``limit`` bytes in all and that
    fits the free memory, read from its directory only: a truncated file or a zip bomb is refused
    before numpy unpacks anything."""
    import zipfile

    size = check_file(path, what)
    hint = f" {hint}" if hint else ""
    if size == 0:
        raise InputError(f"{path}: empty (0 bytes); expected an {what} file.{hint}")
    try:
        with zipfile.ZipFile(path) as z:
            unpacked = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise InputError(f"{path}: not a readable {what} (not a complete zip archive: {e}); damaged or "
                         f"truncated?{hint}") from None
    free = available_memory()
    if unpacked > limit or (free is not None and unpacked > free):
        raise InputError(f"{path}: its arrays would unpack to {human(unpacked)}, more than "
                         + (f"an {what} holds ({human(limit)})" if unpacked > limit else
                            f"the free memory ({human(free)})") + f".{hint}")
