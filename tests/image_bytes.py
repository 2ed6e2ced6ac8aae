"""Image files written byte for byte, for tests that need files no encoder writes (plain Python: the Triton
test environment has no Hypothesis)."""

import struct
import zlib


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2, body: bytes = b"") -> bytes:
    """A PNG that declares ``width`` x ``height`` in its header but holds only ``body`` as image data:
    the shape of a decompression bomb (or of a lying file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")
