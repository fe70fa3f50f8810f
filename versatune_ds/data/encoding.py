"""Text encodings of data files: UTF-8 (with or without a byte-order mark) is read; anything else is named.

Spreadsheet programs and Windows editors save "UTF-8 with BOM", UTF-16, or a legacy code page
(Latin-1 / Windows-1252). A UTF-8 BOM is harmless and removed. The others are refused with one line that
says which encoding the bytes look like and how to convert the file, instead of a decoding traceback or a
misleading "not valid JSON at column 1".
"""

from __future__ import annotations

import codecs

UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_UTF32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)


def strip_utf8_bom(data: bytes) -> bytes:
    return data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data


def foreign_encoding(head: bytes) -> str | None:
    """The name of a non-UTF-8 Unicode encoding the first bytes of a file show (UTF-16/32 BOM, or NUL bytes
    between ASCII letters), else None."""
    if head.startswith(_UTF32_BOMS):  # (checked before UTF-16: the UTF-32 LE BOM starts with the UTF-16 LE one)
        return "UTF-32"
    if head.startswith(_UTF16_BOMS):
        return "UTF-16"
    sample = head[:64]
    if len(sample) >= 4 and sample.count(0) * 3 >= len(sample):  # ASCII text in UTF-16 is every other byte NUL
        return "UTF-16"
    return None


def convert_hint(encoding: str, path: str) -> str:
    return f"save it as UTF-8 (e.g. iconv -f {encoding} -t UTF-8 {path} > {path}.utf8)"


def undecodable_reason(data: bytes, start: int) -> str:
    """Why `data` is not UTF-8 at byte `start`, with a guess at the encoding it is in."""
    byte = data[start]
    if 0x80 <= byte <= 0xFF:
        guess = "Latin-1 / Windows-1252" if _looks_single_byte(data, start) else "an encoding other than UTF-8"
        return f"not UTF-8 text (byte 0x{byte:02x}; the file looks like {guess})"
    return f"not UTF-8 text (byte 0x{byte:02x})"


def _looks_single_byte(data: bytes, start: int) -> bool:
    # A byte >= 0x80 that does not start a valid UTF-8 sequence, followed by ASCII: typical of Latin-1 ("caf\xe9 ").
    following = data[start + 1 : start + 2]
    return not following or following[0] < 0x80 or data[start] < 0xC0


def decode_utf8(data: bytes, path: str) -> tuple[str | None, str]:
    """(text, "") for UTF-8 bytes (a leading BOM removed), or (None, reason) naming the encoding and the fix.

    The reason holds the 1-based line of the first bad byte: `path:line: not UTF-8 text ...; save it as UTF-8`.
    """
    foreign = foreign_encoding(data[:64])
    if foreign is not None:
        return None, f"{path}: the file is {foreign} text, not UTF-8; {convert_hint(foreign, path)}"
    try:
        return strip_utf8_bom(data).decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(UTF8_BOM) if data.startswith(UTF8_BOM) else 0)
        line = data.count(b"\n", 0, offset) + 1
        encoding = "latin1" if "Latin-1" in undecodable_reason(data, offset) else "<encoding>"
        return None, f"{path}:{line}: {undecodable_reason(data, offset)}; {convert_hint(encoding, path)}"
