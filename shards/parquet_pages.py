"""What arrow would decompress and decode reading a Parquet file, read from its page headers before arrow reads it
(for index.parquet, which a stranger may have written: see `_parquet_table` in shards.manifest).

Arrow trusts each page's own header: it decompresses a page into as many bytes as the header declares, and decodes as
many values, whatever the footer's column sizes say (nothing checks the footer against the pages, so a footer can say
anything). The pages are walked here as arrow's page reader walks them: from each column chunk's first page to the
end the footer gives the chunk, one Thrift (compact protocol) PageHeader at a time. Nothing is decompressed or decoded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.parquet as pq

DATA_PAGE, DATA_PAGE_V2 = 0, 3  # parquet.thrift's PageType (1 is an index page, 2 a dictionary page)
# text encodings (parquet.thrift's Encoding) that arrow cannot read into a dictionary, only value by value, and in
# DELTA_BYTE_ARRAY each value repeats a prefix of the one before: a few bits can stand for a value as long as the page
WHOLE_TEXT_ENCODINGS = {6: "DELTA_LENGTH_BYTE_ARRAY", 7: "DELTA_BYTE_ARRAY"}
FIXED_WIDTH = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}  # bytes of a decoded value
MAX_DEPTH = 8  # Thrift structs and lists nested in a page header (statistics in a data page header: 3)


@dataclass
class Pages:
    """One leaf column's pages over every row group."""

    width: int  # bytes of one decoded value, 0 for text (variable-length BYTE_ARRAY)
    decoded_bytes: int = 0  # the pages' declared uncompressed sizes: what arrow decompresses them into
    values: int = 0  # the data pages' value counts (nulls and empty lists included): what arrow decodes
    encodings: set[int] = field(default_factory=set)  # the data pages' value encodings

    def most_bytes(self) -> int:
        """What the pages can take decoded, text aside: a dictionary-encoded page holds a small index per value, and
        arrow writes out the fixed-width value it names (text named by many rows: read it as a dictionary)."""
        return max(self.decoded_bytes, self.values * self.width)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value, pos, shift = value | (byte & 0x7F) << shift, pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
        if shift > 63:
            raise ValueError("a Thrift integer longer than 64 bits")


def _integer(data: bytes, pos: int) -> tuple[int, int]:
    value, pos = _varint(data, pos)
    return (value >> 1) ^ -(value & 1), pos  # zigzag


def _value(data: bytes, pos: int, kind: int, depth: int) -> tuple[object, int]:
    """The Thrift compact value of type `kind` at `pos` -> (an integer or a struct's {field id: value}, else None;
    the position after it)."""
    if kind in (1, 2, 3):  # a bool in a list or map, or a byte
        return data[pos], pos + 1
    if kind in (4, 5, 6):
        return _integer(data, pos)
    if kind in (7, 8):  # a double; binary
        size, pos = (8, pos) if kind == 7 else _varint(data, pos)
        return None, pos + size
    if kind == 12:
        return _struct(data, pos, depth + 1)
    if kind in (9, 10):  # list, set
        size, kinds, pos = data[pos] >> 4, [data[pos] & 0x0F], pos + 1
        if size == 15:
            size, pos = _varint(data, pos)
    elif kind == 11:  # map
        size, pos = _varint(data, pos)
        kinds, pos = ([data[pos] >> 4, data[pos] & 0x0F], pos + 1) if size else ([], pos)
    else:
        raise ValueError(f"a Thrift value of unknown type {kind}")
    if depth >= MAX_DEPTH:
        raise ValueError("Thrift values nested too deep")
    for _ in range(size):  # every element takes at least a byte: a false size ends at the end of the data
        for element in kinds:
            pos = _value(data, pos, element, depth + 1)[1]
    return None, pos


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def _struct(data: bytes, pos: int, depth: int = 0) -> tuple[dict[int, object], int]:
    if depth > MAX_DEPTH:
        raise ValueError("Thrift structs nested too deep")
    fields: dict[int, object] = {}
    last = 0
    while data[pos]:
        kind, delta, pos = data[pos] & 0x0F, data[pos] >> 4, pos + 1
        last, pos = (last + delta, pos) if delta else _integer(data, pos)
        fields[last], pos = (kind == 1, pos) if kind in (1, 2) else _value(data, pos, kind, depth)  # a bool field
    return fields, pos + 1


def column_pages(data: bytes, metadata: pq.FileMetaData) -> dict[str, Pages]:
    """Each leaf column's pages by its path ("anchor_id", "positive_distance.list.element"): every page that starts
    inside a column chunk as the footer places it, walked as arrow walks them. ValueError for what cannot be walked
    (arrow would not read it either)."""
    columns: dict[str, Pages] = {}
    try:
        for g in range(metadata.num_row_groups):
            for c in range(metadata.num_columns):
                chunk, leaf = metadata.row_group(g).column(c), metadata.schema.column(c)
                width = FIXED_WIDTH.get(leaf.physical_type, leaf.length)  # leaf.length: of a FIXED_LEN_BYTE_ARRAY
                pages = columns.setdefault(chunk.path_in_schema, Pages(width))
                pos = chunk.data_page_offset  # arrow's start: the dictionary page, where it comes first
                if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < pos:
                    pos = chunk.dictionary_page_offset
                end = pos + chunk.total_compressed_size
                if pos < 0 or not pos <= end <= len(data):
                    raise ValueError(f"column {chunk.path_in_schema} lies outside the file")
                while pos < end:
                    header, pos = _struct(data, pos)
                    kind, size, stored = header.get(1), header.get(2), header.get(3)
                    if type(size) is not int or type(stored) is not int or size < 0 or stored < 0:
                        raise ValueError("a page header without its sizes")
                    pages.decoded_bytes += size
                    page = header.get(5 if kind == DATA_PAGE else 8) if kind in (DATA_PAGE, DATA_PAGE_V2) else None
                    if isinstance(page, dict):
                        pages.values += _count(page.get(1))
                        pages.encodings.add(page.get(2 if kind == DATA_PAGE else 4))
                    pos += stored
    except IndexError:
        raise ValueError("a page header runs past the end of the file") from None
    return columns
