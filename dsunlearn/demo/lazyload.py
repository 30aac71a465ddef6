"""R lazy-load databases (``data/Rdata.rdx`` + ``Rdata.rdb``): how R packages ship their data sets (Austen's novels in
r-cran-janeaustenr, Moby Dick in r-cran-tokenizers).

The serialized R objects are parsed by the ``rdata`` package (R's XDR serialization format). What ``rdata`` does not
cover is the lazy-load framing around them, R's ``lazyLoadDBfetch`` (``src/main/serialize.c``), done here: the ``.rdx``
index is a gzip-compressed serialized ``list(variables = list(name = c(offset, length)), references, compressed)``;
each object sits in the ``.rdb`` at ``offset``, ``length`` bytes: a 4-byte big-endian uncompressed length, then
(compression 2/3 only) a one-byte type marker, then the compressed serialized object.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import warnings
import zlib

import rdata

__all__ = ["read_lazyload_db", "unserialize"]


def unserialize(data: bytes):
    """One serialized R object (no file header: lazy-load objects are bare) as Python values (``rdata`` conversion:
    character vectors become numpy string arrays, lists dicts)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unknown file type")  # bare objects carry no RDS/RDX magic
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def _decompress(blob: bytes, compression: int) -> bytes:
    (n,) = struct.unpack(">I", blob[:4])
    if compression in (2, 3):  # a type byte follows: 'Z' zlib, '2' bzip2, 'X' xz, '0' stored
        kind, body = blob[4:5], blob[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": lambda b: b}[kind](body)
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise ValueError(f"R lazy-load object decompressed to {len(out)} bytes, expected {n}")
    return out


def read_lazyload_db(rdx: bytes, rdb: bytes) -> dict:
    """All variables of an R lazy-load database, given the bytes of its ``.rdx`` and ``.rdb`` files. Character vectors
    come back as lists of ``str`` (``None`` for NA)."""
    index = unserialize(gzip.decompress(rdx))
    compressed = index.get("compressed", [True])[0]
    compression = 1 if compressed is True else int(compressed)
    out = {}
    for name, (offset, length) in index["variables"].items():
        value = unserialize(_decompress(rdb[int(offset): int(offset) + int(length)], compression))
        if getattr(value, "dtype", None) is not None and value.dtype.kind in "UO":
            value = [None if v is None else str(v) for v in value]
        out[str(name)] = value
    return out
