"""A minimal reader for R lazy-load databases (`data/Rdata.rdx` + `Rdata.rdb`) and R's XDR serialization.

Enough of R's format to read the character vectors that R packages ship as data; no R and no numpy needed.
Format: R Internals, "Serialization Formats" (https://cran.r-project.org/doc/manuals/r-release/R-ints.html) and
`src/main/serialize.c`. A lazy-load index (`.rdx`) is a gzip-compressed serialized list
`list(variables = list(name = c(offset, length)), references = ..., compressed = ...)`; each object in the `.rdb` sits
at `offset`, `length` bytes: a 4-byte big-endian uncompressed length, then (compression 2/3 only) a one-byte type
marker, then the compressed serialized object.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib

__all__ = ["RVector", "read_lazyload_db", "unserialize"]

# SEXP type codes (Rinternals.h) and the pseudo-types used only in serialized streams (serialize.c).
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _DOTSXP = 9, 10, 13, 14, 15, 16, 17
_VECSXP, _EXPRSXP, _RAWSXP, _S4SXP = 19, 20, 24, 25
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP = 255, 254, 253, 252, 251
_BASENAMESPACE_SXP, _NAMESPACESXP, _PACKAGESXP, _PERSISTSXP = 250, 249, 248, 247
_EMPTYENV_SXP, _BASEENV_SXP, _ALTREP_SXP = 242, 241, 238
_NA_INT = -(2**31)


class RVector(list):
    """An R vector as a Python list; R attributes (`names`, `class`, ...) in `.attrs`."""

    def __init__(self, items=(), attrs: dict | None = None):
        super().__init__(items)
        self.attrs = attrs or {}

    def named(self) -> dict:
        """The vector as a dict keyed by its `names` attribute."""
        return dict(zip(self.attrs["names"], self))


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        if len(b) != n:
            raise ValueError("truncated R serialization stream")
        self.pos += n
        return b

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: upper and lower 32 bits follow
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def header(self) -> None:
        if self.raw(2) != b"X\n":
            raise ValueError("only R's binary XDR serialization ('X\\n') is supported")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader R version
        if version == 3:
            self.raw(self.int())  # native encoding name; strings carry their own UTF-8/latin1 flags
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def item(self):
        flags = self.int()
        t, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (_NILVALUE_SXP, _EMPTYENV_SXP, _BASEENV_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP,
                 _MISSINGARG_SXP, _BASENAMESPACE_SXP):
            return None
        if t == _REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t in (_PERSISTSXP, _NAMESPACESXP, _PACKAGESXP):
            self.int()  # always 0
            names = [self.item() for _ in range(self.int())]
            obj = ("<" + {_PERSISTSXP: "persist", _NAMESPACESXP: "namespace", _PACKAGESXP: "package"}[t]
                   + ":" + ",".join(map(str, names)) + ">")
            self.refs.append(obj)
            return obj
        if t == _SYMSXP:
            sym = self.item()
            self.refs.append(sym)
            return sym
        if t == _ENVSXP:
            env: dict = {}
            self.refs.append(env)  # registered before its contents: environments may refer to themselves
            self.int()  # locked
            env.update(enclos=self.item(), frame=self.item(), hashtab=self.item(), attrs=self.item())
            return env
        if t in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP):
            # A pairlist chain; walk the CDRs iteratively so long lists do not exhaust Python's stack.
            cells = []
            while True:
                if has_attr:
                    self.item()  # attributes of a pairlist cell: not needed here
                tag = self.item() if has_tag else None
                cells.append((tag, self.item()))
                nxt = self.int()
                nt = nxt & 0xFF
                if nt not in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP, _DOTSXP):
                    self.pos -= 4
                    self.item()  # the terminating CDR (normally R_NilValue)
                    return cells
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
        if t == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            b = self.raw(n)
            return b.decode("latin-1") if levels & (1 << 2) else b.decode("utf-8", errors="replace")
        if t == _ALTREP_SXP:
            info, state, attrs = self.item(), self.item(), self.item()
            return self._altrep(info, state, attrs)
        if t in (_LGLSXP, _INTSXP):
            n = self.length()
            vals = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            vec = RVector(None if v == _NA_INT else v for v in vals)
        elif t == _REALSXP:
            n = self.length()
            vec = RVector(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif t == _CPLXSXP:
            n = self.length()
            v = struct.unpack_from(f">{2 * n}d", self.data, self.pos)
            self.pos += 16 * n
            vec = RVector(complex(v[2 * i], v[2 * i + 1]) for i in range(n))
        elif t in (_STRSXP, _VECSXP, _EXPRSXP):
            vec = RVector(self.item() for _ in range(self.length()))
        elif t == _RAWSXP:
            vec = RVector(self.raw(self.length()))
        elif t == _S4SXP:
            vec = RVector()
        else:
            raise ValueError(f"unsupported R object type {t} at byte {self.pos - 4}")
        if has_attr:
            vec.attrs = {tag: v for tag, v in self.item()}
        return vec

    @staticmethod
    def _altrep(info, state, attrs):
        kind = info[0][1] if isinstance(info, list) and info else None
        if kind == "compact_intseq" or kind == "compact_realseq":
            n, start, step = state
            vec = RVector(start + i * step for i in range(int(n)))
            if kind == "compact_intseq":
                vec = RVector(int(v) for v in vec)
        elif kind == "deferred_string":
            vec = RVector(str(v) for v in state[0][1])
        elif kind and kind.startswith("wrap_"):
            vec = RVector(state[0])
        else:
            raise ValueError(f"unsupported ALTREP class {kind!r}")
        if attrs:
            vec.attrs = {tag: v for tag, v in attrs}
        return vec


def unserialize(data: bytes):
    """Parse one object in R's binary XDR serialization (as written by `saveRDS(compress = FALSE)`)."""
    r = _Reader(data)
    r.header()
    return r.item()


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
    """All variables of an R lazy-load database, given the bytes of its `.rdx` and `.rdb` files."""
    index = unserialize(gzip.decompress(rdx)).named()
    compressed = index.get("compressed", RVector([True]))[0]
    compression = 1 if compressed is True else int(compressed)
    out = {}
    for name, (offset, length) in index["variables"].named().items():
        out[name] = unserialize(_decompress(rdb[int(offset) : int(offset) + int(length)], compression))
    return out
