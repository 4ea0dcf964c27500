"""Protobuf wire format by hand, for attacking the gateway: an encoder that can write what no protobuf
library writes (over-long varints, any field number and wire type, lengths that lie), and a reading
of a message's top-level fields the way protobuf C++ (Triton's parser) reads them.

C++ (``google::protobuf::internal::ReadTag``) reads a tag as a varint of at most 5 bytes and keeps
its low 32 bits; upb (Python's ``ParseFromString``) refuses a tag above 2^32 - 1. A gateway that reads
tags as 64-bit integers sees another field number than both: the bypass of issue "the gateway must
parse what Triton parses"."""

from __future__ import annotations


def varint(n: int, pad: int = 0) -> bytes:
    """``n`` (as unsigned 64-bit) as a varint; ``pad`` extra zero groups make it over-long."""
    n &= (1 << 64) - 1
    groups = []
    while True:
        groups.append(n & 0x7F)
        n >>= 7
        if not n:
            break
    groups += [0] * pad
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def tag(field: int, wire: int, pad: int = 0, high: int = 0) -> bytes:
    """A tag; ``high`` adds multiples of 2^32 (bits C++ drops, upb refuses)."""
    return varint(((field << 3) | wire) + (high << 32), pad)


def ld(
    field: int, payload: bytes, tag_pad: int = 0, len_pad: int = 0, high: int = 0, length: int | None = None
) -> bytes:
    """A length-delimited field; ``length`` overrides the true length (a lie)."""
    n = len(payload) if length is None else length
    return tag(field, 2, tag_pad, high) + varint(n, len_pad) + payload


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(message).to_bytes(4, "big") + message


class CppParseError(ValueError):
    pass


def _read_varint(b: bytes, pos: int, max_bytes: int) -> tuple[int, int]:
    value, shift, start = 0, 0, pos
    while True:
        if pos >= len(b) or pos - start >= max_bytes:
            raise CppParseError("varint runs past the message or its limit")
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def cpp_model_name(message: bytes) -> str:
    """``model_name`` (field 1) as protobuf C++ reads the top level of ``message``: tags of at most 5
    bytes truncated to 32 bits, the last occurrence winning. Raises CppParseError where C++ fails."""
    pos, name = 0, ""
    while pos < len(message):
        key, pos = _read_varint(message, pos, 5)
        key &= 0xFFFFFFFF
        field, wire = key >> 3, key & 7
        if field == 0:
            raise CppParseError("field 0")
        if wire == 0:
            _, pos = _read_varint(message, pos, 10)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            n, pos = _read_varint(message, pos, 5)
            if n > 0x7FFFFFFF or pos + n > len(message):
                raise CppParseError("length past the end")
            if field == 1:
                try:
                    name = message[pos : pos + n].decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CppParseError("invalid UTF-8 in a proto3 string") from e
            pos += n
        elif wire == 5:
            pos += 4
        else:
            raise CppParseError(f"wire type {wire} (groups are not followed by this reading)")
        if pos > len(message):
            raise CppParseError("field past the end")
    return name
