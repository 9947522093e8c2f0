#!/usr/bin/env python3
"""Writes the fuzzers' seed corpora (tests/fuzz/corpus/{npy,state,api}/).

The state files are written here from the layout documented in include/muon/driver/state_file.hpp,
independently of the C++ writer, for the model in fuzz_state.cpp (muon 'w' 3x2, adamw 'b' 1x4,
double). tests/test_state.cpp loads corpus/state/valid.bin and checks the values below;
tests/test_sharded.cpp loads corpus/state/valid_sharded.bin, the same state in the sharded
layout (rank 0 of 1).

Regenerate: /usr/bin/python3 tests/fuzz/make_corpus.py tests/fuzz/corpus
"""
import io
import os
import struct
import sys

import numpy as np

MAGIC = b"\x89MUON\r\n\x1a"
SHARDED_MAGIC = b"\x89MUONDP\x1a"


def fnv1a64(data: bytes) -> int:
    h = 0xcbf29ce484222325
    for c in data:
        h = ((h ^ c) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def records(sharded):
    """The two parameters' records; sharded ones carry their piece (here the whole matrix)."""
    def record(rule, name, rows, cols, updates, *buffers):
        extents = (rows, cols) + ((0, 0, rows, cols) if sharded else ())
        out = struct.pack("<BQ", rule, len(name)) + name
        out += struct.pack(f"<{len(extents) + 1}Q", *extents, updates)
        for values in buffers:
            out += struct.pack(f"<{len(values)}d", *values)
        return out
    # muon 'w' 3x2: momentum M[i] = 0.1 * (i + 1)
    out = record(0, b"w", 3, 2, 0, [0.1 * (i + 1) for i in range(6)])
    # adamw 'b' 1x4, 7 AdamW steps: m[i] = -(i + 1), v[i] = 0.5 * (i + 1)
    out += record(1, b"b", 1, 4, 7, [-(i + 1.0) for i in range(4)], [0.5 * (i + 1) for i in range(4)])
    return out


def state_body(steps=1):
    """Everything after the version field, without the checksum."""
    return struct.pack("<IQQ", 8, steps, 2) + records(sharded=False)


def sharded_state_body(steps):
    """The sharded layout, after the version field, without the checksum: rank 0 of 1,
    owner_compute."""
    return struct.pack("<IIIBQQ", 8, 1, 0, 0, steps, 2) + records(sharded=True)


def framed(body: bytes, magic=MAGIC) -> bytes:
    head = magic + struct.pack("<I", 1) + body
    return head + struct.pack("<Q", fnv1a64(head))


def npy_bytes(a, version=None):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def main(root):
    os.makedirs(os.path.join(root, "state"), exist_ok=True)
    os.makedirs(os.path.join(root, "npy"), exist_ok=True)
    os.makedirs(os.path.join(root, "api"), exist_ok=True)
    seeds = {
        "state/valid.bin": framed(state_body(steps=5)),
        "state/valid_sharded.bin": framed(sharded_state_body(steps=5), SHARDED_MAGIC),
        "state/framed_body": b"F" + state_body(steps=5),
        "state/wrong_scalar": b"F" + struct.pack("<I", 4) + state_body()[4:],
        "state/no_params": b"F" + struct.pack("<IQQ", 8, 0, 0),
    }
    a = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    seeds.update({
        "npy/c_f8.npy": npy_bytes(a),
        "npy/fortran_f4.npy": npy_bytes(np.asfortranarray(a.astype(np.float32))),
        "npy/big_endian_3d.npy": npy_bytes(a.reshape(2, 3, 2).astype(">f4")),
        "npy/v2_empty.npy": npy_bytes(np.zeros((0, 5)), version=(2, 0)),
        "npy/v3_scalar.npy": npy_bytes(np.float64(1.5), version=(3, 0)),
    })
    # fuzz_api: a policy byte, then 6 bytes a call (kind, slot, variant, seed, rank, value;
    # kinds as listed in tests/api_model.hpp: 0-1 add, 6-7 gradients, 8-10 step, 13 save,
    # 14 load, 16 fork). Each seed registers everything and steps; the fuzzer mutates from there.
    def calls(*kinds, slot=0):
        return bytes(b for k in kinds for b in (k, slot, 1, 3, 1, 50))
    register = calls(0, 0, 0, 0)
    for policy in range(3):
        seeds[f"api/steps_{policy}"] = bytes([policy]) + register + calls(6, 8, 6, 8)
        seeds[f"api/resume_{policy}"] = (bytes([policy]) + register + calls(6, 8, 13, 16) +
                                         calls(6, 8, 14, 6, 9))
    for name, data in seeds.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus"))
