"""Wire format of the teacher server (version 1): a JSON header and raw little-endian arrays.

Every binary body (a score request, a score response) is one *frame*:

    offset 0   4 bytes   magic b"OPDW"
    offset 4   4 bytes   uint32 little-endian H: length of the header in bytes
    offset 8   H bytes   UTF-8 JSON object, padded with spaces so that 8 + H is a multiple of 8
    then                 the arrays named in header["arrays"], in that order, back to back, each
                         little-endian and C-ordered; nothing after the last one

header["arrays"] is a list of [name, dtype, shape] with dtype one of "int32", "float32",
"float64" (so every array starts 4-byte aligned) and shape a list of non-negative ints.
header["version"] is 1. Everything else in the header is metadata of the message:

Score request (POST /v1/score, Content-Type application/x-opd-frame):
    k             int, 1 <= k <= min(max_k, vocab_limit): size of the teacher top-k
    temperature   float > 0: log-probs are of softmax(logits[:vocab_limit] / temperature)
    vocab_limit   int or null: score over token ids < vocab_limit (null: the model's rows);
                  the student side sends its shared vocabulary (embedding tables are padded)
    lengths       [B] ints: tokens of each sequence (prompt + response)
    response_starts [B] ints, 1 <= s <= length: index of the first response token. The
                  response positions of a sequence are t = s-1 .. length-2, the positions
                  whose next token is a response token: length - s of them, P in all.
    arrays        token_ids int32 (sum(lengths),): the sequences, concatenated
                  requested_ids int32 (P, k), optional: per response position, the ids
                  whose teacher log-probs are wanted (the student's top-k)

Score response (200, same content type):
    k, vocab_limit, positions [B] (= length - s per sequence), dtype ("float32"/"float64")
    arrays        topk_ids int32 (P, k): teacher top-k, by log-prob desc then id asc
                  topk_log_probs (P, k)
                  requested_log_probs (P, k): only when the request had requested_ids
                  sampled_log_probs (P,): log-prob of the realised next token
                  entropy (P,): H(q_t) over the vocab_limit ids

Per response token at k = 16 that is 12k + 8 = 200 bytes back (float32), against
4 * 151,936 = 607,744 bytes of float32 logits at V = 151,936 (0.033%).

Metadata endpoints and every error answer are JSON (errors: {"error": message, "status": n}).
"""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np

MAGIC = b"OPDW"
VERSION = 1
CONTENT_TYPE = "application/x-opd-frame"
JSON_TYPE = "application/json"
DTYPES = {"int32": np.dtype("<i4"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
_NAMES = {value: key for key, value in DTYPES.items()}
_PREFIX = struct.Struct("<4sI")
# A valid header is a few KiB nested 4 deep; bounded so that no header costs a deep recursion
# (json.loads raises RecursionError) or a large parse before it is refused.
MAX_HEADER_BYTES = 1 << 20
MAX_HEADER_DEPTH = 32
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


class ProtocolError(ValueError):
    """A body that is not a valid frame (or not a valid message); the server answers 400."""


def encode_frame(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """meta (JSON-able, without "version"/"arrays") + named arrays -> one frame."""
    listing, blobs = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise TypeError(f"array {name!r}: dtype {array.dtype} not in {sorted(DTYPES)}")
        array = np.ascontiguousarray(array, dtype=DTYPES[_NAMES[dtype]])
        listing.append([name, _NAMES[dtype], list(array.shape)])
        blobs.append(array.tobytes())
    header = json.dumps({"version": VERSION, **meta, "arrays": listing}).encode()
    header += b" " * (-(_PREFIX.size + len(header)) % 8)
    return b"".join([_PREFIX.pack(MAGIC, len(header)), header, *blobs])


def _nesting(text: bytes) -> int:
    """How deep the brackets of a JSON text nest (those inside strings left out)."""
    codes = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    opened = (codes == ord("[")).astype(np.int64) + (codes == ord("{"))
    closed = (codes == ord("]")).astype(np.int64) + (codes == ord("}"))
    return int(np.cumsum(opened - closed).max(initial=0))


def decode_frame(
    body: bytes, max_elements: int = 1 << 31, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict, dict[str, np.ndarray]]:
    """One frame -> (header, {name: read-only array}); raises ProtocolError on anything off,
    a header over max_header_bytes or nested deeper than MAX_HEADER_DEPTH included."""
    view = memoryview(body)
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"frame too short ({len(view)} bytes)")
    magic, header_length = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}; expected {MAGIC!r} (wire format v1)")
    if header_length > len(view) - _PREFIX.size:
        raise ProtocolError(f"header length {header_length} exceeds the frame")
    if header_length > max_header_bytes:
        raise ProtocolError(
            f"header of {header_length} bytes exceeds the limit of {max_header_bytes}"
        )
    text = bytes(view[_PREFIX.size : _PREFIX.size + header_length])
    depth = _nesting(text)
    if depth > MAX_HEADER_DEPTH:
        raise ProtocolError(f"header nests {depth} deep; at most {MAX_HEADER_DEPTH} levels")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ProtocolError(f"header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    if header.get("version") != VERSION:
        raise ProtocolError(f"unsupported wire format version {header.get('version')!r}")
    listing = header.get("arrays")
    if not isinstance(listing, list):
        raise ProtocolError("header.arrays must be a list of [name, dtype, shape]")
    arrays, offset, total_elements = {}, _PREFIX.size + header_length, 0
    for entry in listing:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError(f"header.arrays entry {entry!r} is not [name, dtype, shape]")
        name, dtype_name, shape = entry
        if not isinstance(name, str) or name in arrays:
            raise ProtocolError(f"array name {name!r} is not a new string")
        if dtype_name not in DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype_name!r} not in {sorted(DTYPES)}")
        if not (
            isinstance(shape, list)
            and len(shape) <= 4
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ProtocolError(f"array {name!r}: shape {shape!r} is not a list of ints >= 0")
        count = math.prod(shape)  # Python ints: [2**32, 2**32] must not wrap around
        total_elements += count
        if total_elements > max_elements:
            raise ProtocolError(f"arrays hold more than {max_elements} elements")
        dtype = DTYPES[dtype_name]
        end = offset + count * dtype.itemsize
        if end > len(view):
            raise ProtocolError(
                f"array {name!r} needs {end - offset} bytes, {len(view) - offset} remain"
            )
        arrays[name] = np.frombuffer(view[offset:end], dtype=dtype).reshape(shape)
        offset = end
    if offset != len(view):
        raise ProtocolError(f"{len(view) - offset} trailing bytes after the last array")
    return header, arrays


# ---- score messages ------------------------------------------------------------------------


def encode_score_request(
    sequences: list[np.ndarray],
    response_starts: list[int],
    k: int,
    temperature: float,
    vocab_limit: int | None,
    requested_ids: np.ndarray | None = None,
) -> bytes:
    """sequences: B int arrays of token ids; requested_ids: (P, k) for the P response
    positions of all sequences in order, or None."""
    lengths = [len(s) for s in sequences]
    arrays = {
        "token_ids": np.concatenate([np.asarray(s) for s in sequences]).astype("<i4")
        if sequences
        else np.zeros(0, "<i4")
    }
    if requested_ids is not None:
        arrays["requested_ids"] = np.asarray(requested_ids).astype("<i4")
    meta = {
        "k": int(k),
        "temperature": float(temperature),
        "vocab_limit": None if vocab_limit is None else int(vocab_limit),
        "lengths": lengths,
        "response_starts": [int(s) for s in response_starts],
    }
    return encode_frame(meta, arrays)


RESPONSE_ARRAYS = (
    "topk_ids",
    "topk_log_probs",
    "requested_log_probs",
    "sampled_log_probs",
    "entropy",
)


def encode_score_response(
    k: int, vocab_limit: int, positions: list[int], arrays: dict[str, np.ndarray]
) -> bytes:
    """arrays: the RESPONSE_ARRAYS (requested_log_probs optional), all rows concatenated."""
    ordered = {name: arrays[name] for name in RESPONSE_ARRAYS if name in arrays}
    ordered["topk_ids"] = np.asarray(ordered["topk_ids"]).astype("<i4")
    dtype = np.asarray(ordered["topk_log_probs"]).dtype
    meta = {"k": k, "vocab_limit": vocab_limit, "positions": positions, "dtype": str(dtype)}
    return encode_frame(meta, ordered)


def decode_score_response(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Checks that every array has the advertised shape; raises ProtocolError otherwise."""
    header, arrays = decode_frame(body)
    try:
        k = int(header["k"])
        positions = [int(p) for p in header["positions"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError(f"score response header lacks k/positions: {error}") from None
    total = sum(positions)
    expected = {
        "topk_ids": (total, k),
        "topk_log_probs": (total, k),
        "sampled_log_probs": (total,),
        "entropy": (total,),
    }
    if "requested_log_probs" in arrays:
        expected["requested_log_probs"] = (total, k)
    for name, shape in expected.items():
        if name not in arrays or arrays[name].shape != shape:
            got = None if name not in arrays else arrays[name].shape
            raise ProtocolError(f"score response {name}: expected shape {shape}, got {got}")
    if arrays["topk_ids"].dtype != DTYPES["int32"]:
        raise ProtocolError("score response topk_ids must be int32")
    return header, arrays
