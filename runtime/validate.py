"""Check every ``fips.SparseMatMul`` / ``fips.QSparseMatMul`` node of an ONNX file against the op's validity rule before onnxruntime sees it.

The rule is written down once, in docs/sparse-op.md; the native kernel (runtime/kernels) and the
function body (exporter/sparse_op.py) enforce it too, each on its own. This pass runs in
:func:`fips_rt.runtime.session.create_session` (so in ``Model.load``, ``fips bench``, ``fips serve``)
before the session is created, whichever kernel path is chosen, and turns a crafted or corrupt file
into one :class:`~fips_rt.runtime.session.FipsRuntimeError` line naming the node and what is wrong.

No ``onnx`` package (nor ``google.protobuf``): the file is walked with a small reader of the
protobuf wire format, over an mmap of the file, for the few fields of onnx.proto this pass needs
(ModelProto.graph; GraphProto node / initializer / input / output / value_info; NodeProto;
AttributeProto; TensorProto dims / data_type / raw_data / int32_data / external_data;
ValueInfoProto types; field numbers of onnx.proto). Nothing is copied: initializer bytes stay
in the mapping, only the mask bytes are read (to count the kept entries), from the file or from
its external data (``location`` / ``offset`` / ``length``, refused when outside the model
folder or beyond the data file). Repeated occurrences of a message field are merged, as
protobuf does. Unknown fields are skipped.

What can only be known at run time (inputs that are graph inputs or computed, an A whose last
dimension the graph does not declare) is left to the kernels, which both raise at run time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mmap

import numpy as np

DOMAIN = "fips"
OP_TYPE = "SparseMatMul"
Q_OP_TYPE = "QSparseMatMul"     # int8 / int4 codes + scales (docs/sparse-op.md, "fips.QSparseMatMul")
MAX_BITS = 2 ** 31 - 1          # rows * cols <= MAX_BITS

# TensorProto.DataType values used here
FLOAT, UINT8, INT8, FLOAT16 = 1, 2, 3, 10
_DTYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
                9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
ATTR_INT = 2                    # AttributeProto.AttributeType.INT
ATTR_GRAPH, ATTR_GRAPHS = 5, 10
EXTERNAL = 1                    # TensorProto.DataLocation.EXTERNAL


class ModelValidationError(ValueError):
    """A node breaks the rule of docs/sparse-op.md (the session module re-raises it as FipsRuntimeError)."""


# ---------------------------------------------------------------------------- wire format
_CHUNK = 1 << 24  # bytes read / decoded at a time
MAX_DEPTH = 64  # nesting of subgraphs (onnxruntime's protobuf parser stops at 100 levels)


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ModelValidationError("not an ONNX model (truncated or malformed protobuf varint)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, spans):
    """(field number, wire type, value) of the messages at ``spans`` (a list of (start, end): the
    occurrences of one message field, merged in order). value: an int for varint / fixed fields,
    a (start, end) span for length-delimited ones."""
    for start, end in spans:
        pos = start
        while pos < end:
            key, pos = _varint(buf, pos, end)
            number, wt = key >> 3, key & 7
            if wt == 0:
                value, pos = _varint(buf, pos, end)
            elif wt == 2:
                n, pos = _varint(buf, pos, end)
                if n > end - pos:
                    raise ModelValidationError("not an ONNX model (a protobuf field runs past its message)")
                value, pos = (pos, pos + n), pos + n
            elif wt == 1 or wt == 5:
                size = 8 if wt == 1 else 4
                if size > end - pos:
                    raise ModelValidationError("not an ONNX model (truncated protobuf field)")
                value, pos = int.from_bytes(buf[pos:pos + size], "little"), pos + size
            else:
                raise ModelValidationError(f"not an ONNX model (protobuf wire type {wt})")
            if number == 0:
                raise ModelValidationError("not an ONNX model (protobuf field number 0)")
            yield number, wt, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(buf, wt, value) -> list[int]:
    """A repeated integer field occurrence: packed (a span) or one varint."""
    if wt == 0:
        return [_signed(value)]
    if wt != 2:
        raise ModelValidationError("not an ONNX model (bad encoding of an integer list)")
    out, (pos, end) = [], value
    while pos < end:
        v, pos = _varint(buf, pos, end)
        out.append(_signed(v))
    return out


def _text(buf, wt, value) -> str:
    if wt != 2:
        raise ModelValidationError("not an ONNX model (a string field is not length-delimited)")
    return bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")


class _T:
    """A TensorProto, shallow: its bytes stay where they are."""

    def __init__(self, buf, spans):
        self.buf = buf
        self.dims: list[int] = []
        self.data_type = 0
        self.name = ""
        self.raw: tuple | None = None
        self.int32_spans: list = []
        self.float_count = 0
        self.external: dict[str, str] = {}
        self.data_location = 0
        for number, wt, v in _fields(buf, spans):
            if number == 1:
                self.dims += _ints(buf, wt, v)
            elif number == 2 and wt == 0:
                self.data_type = _signed(v)
            elif number == 4:  # float_data: packed fixed32, or one fixed32 per occurrence
                if wt == 2:
                    if (v[1] - v[0]) % 4:
                        raise ModelValidationError("not an ONNX model (float_data of a broken length)")
                    self.float_count += (v[1] - v[0]) // 4
                else:
                    self.float_count += 1
            elif number == 5:
                self.int32_spans.append((wt, v))
            elif number == 8:
                self.name = _text(buf, wt, v)
            elif number == 9 and wt == 2:
                self.raw = v
            elif number == 13 and wt == 2:
                key = val = ""
                for n2, w2, v2 in _fields(buf, [v]):
                    if n2 == 1:
                        key = _text(buf, w2, v2)
                    elif n2 == 2:
                        val = _text(buf, w2, v2)
                self.external[key] = val
            elif number == 14 and wt == 0:
                self.data_location = _signed(v)

    def int32_count(self) -> int:
        """Entries of int32_data (varints), counted without decoding them."""
        n = 0
        for wt, v in self.int32_spans:
            if wt == 0:
                n += 1
            elif wt == 2:
                for start in range(v[0], v[1], _CHUNK):
                    block = np.frombuffer(self.buf, np.uint8, count=min(_CHUNK, v[1] - start), offset=start)
                    n += int(np.count_nonzero(block < 0x80))
            else:
                raise ModelValidationError("not an ONNX model (bad encoding of int32_data)")
        return n

    def uint8_blocks(self, what: str):
        """The int32_data of a uint8 tensor, decoded in bounded blocks (numpy, no Python ints per entry).
        Each entry of a uint8 tensor is a varint of 1 or 2 bytes; anything longer is out of range."""
        for wt, v in self.int32_spans:
            if wt == 0:
                if not 0 <= v <= 255:
                    raise ModelValidationError(f"{what}: uint8 data out of range")
                yield np.array([v], np.uint8)
                continue
            pos, end = v
            while pos < end:
                cut = min(end, pos + _CHUNK)
                b = np.frombuffer(self.buf, np.uint8, count=cut - pos, offset=pos)
                ends = np.flatnonzero(b < 0x80)
                if not ends.size or (cut == end and ends[-1] != b.size - 1):
                    raise ModelValidationError("not an ONNX model (a truncated varint in int32_data)")
                last = int(ends[-1]) + 1         # the block ends after its last complete varint
                starts = np.concatenate([[0], ends[:-1] + 1])
                lengths = ends - starts + 1
                if (lengths > 2).any():
                    raise ModelValidationError(f"{what}: uint8 data out of range")
                low = b[starts].astype(np.int64)
                vals = np.where(lengths == 2, (low & 0x7F) | (b[ends].astype(np.int64) << 7), low)
                if vals.size and vals.max() > 255:
                    raise ModelValidationError(f"{what}: uint8 data out of range")
                yield vals.astype(np.uint8)
                pos += last


class _Attr:
    def __init__(self, buf, span):
        self.name = ""
        self.type = 0
        self.i = None
        self.ref_attr_name = ""
        self.t_spans: list = []
        self.graph_spans: list = []      # each entry: the spans of one GraphProto
        g_spans = []
        for number, wt, v in _fields(buf, [span]):
            if number == 1:
                self.name = _text(buf, wt, v)
            elif number == 20 and wt == 0:
                self.type = _signed(v)
            elif number == 3 and wt == 0:
                self.i = _signed(v)
            elif number == 21:
                self.ref_attr_name = _text(buf, wt, v)
            elif number == 5 and wt == 2:
                self.t_spans.append(v)
            elif number == 6 and wt == 2:
                g_spans.append(v)         # one singular field: occurrences merge into one graph
            elif number == 11 and wt == 2:
                self.graph_spans.append([v])
        if g_spans:
            self.graph_spans.append(g_spans)


class _Node:
    def __init__(self, buf, span):
        self.input: list[str] = []
        self.output: list[str] = []
        self.name = self.op_type = self.domain = ""
        self.attribute: list[_Attr] = []
        for number, wt, v in _fields(buf, [span]):
            if number == 1:
                self.input.append(_text(buf, wt, v))
            elif number == 2:
                self.output.append(_text(buf, wt, v))
            elif number == 3:
                self.name = _text(buf, wt, v)
            elif number == 4:
                self.op_type = _text(buf, wt, v)
            elif number == 7:
                self.domain = _text(buf, wt, v)
            elif number == 5 and wt == 2:
                self.attribute.append(_Attr(buf, v))


class _TensorType:
    """TypeProto.Tensor of a ValueInfoProto: elem_type and dims (an int, or None when symbolic/unknown)."""

    def __init__(self):
        self.elem_type = 0
        self.dims: list | None = None


def _value_info(buf, span) -> tuple[str, _TensorType | None]:
    name, type_spans = "", []
    for number, wt, v in _fields(buf, [span]):
        if number == 1:
            name = _text(buf, wt, v)
        elif number == 2 and wt == 2:
            type_spans.append(v)
    tensor_spans = [v for number, wt, v in _fields(buf, type_spans) if number == 1 and wt == 2]
    if not tensor_spans:
        return name, None
    tt = _TensorType()
    shape_spans = []
    for number, wt, v in _fields(buf, tensor_spans):
        if number == 1 and wt == 0:
            tt.elem_type = _signed(v)
        elif number == 2 and wt == 2:
            shape_spans.append(v)
    if shape_spans:
        tt.dims = []
        for number, wt, v in _fields(buf, shape_spans):
            if number == 1 and wt == 2:
                dim = None
                for n2, w2, v2 in _fields(buf, [v]):
                    if n2 == 1 and w2 == 0:
                        dim = _signed(v2)
                    elif n2 == 2:
                        dim = None
                tt.dims.append(dim)
    return name, tt


class _Graph:
    def __init__(self, buf, spans):
        self.node: list[_Node] = []
        self.initializer: list[_T] = []
        self.input: list = []
        self.value_info: list = []       # inputs, value_info and outputs together
        for number, wt, v in _fields(buf, spans):
            if wt != 2:
                continue
            if number == 1:
                self.node.append(_Node(buf, v))
            elif number == 5:
                self.initializer.append(_T(buf, [v]))
            elif number in (11, 12, 13):
                vi = _value_info(buf, v)
                self.value_info.append(vi)
                if number == 11:
                    self.input.append(vi[0])


# ---------------------------------------------------------------------------- the pass
@dataclass
class _Tensor:
    """A constant input: dims, dtype and where its bytes are."""
    dims: tuple
    dtype: int
    proto: object


def _dtype_name(t: int) -> str:
    return _DTYPE_NAMES.get(t, f"type {t}")


def _count(dims, what: str) -> int:
    n = 1
    for d in dims:
        if d < 0:
            raise ModelValidationError(f"{what} has a negative dimension {d}")
        n *= int(d)
        if n >= 2 ** 63:
            raise ModelValidationError(f"{what} has more than 2**63 elements")
    return n


class _Reader:
    """Reads tensor bytes from raw_data / int32_data / external data, bounded by the model folder."""

    def __init__(self, model_dir: Path | None):
        self.model_dir = model_dir.resolve() if model_dir is not None else None

    def external(self, t, nbytes: int, what: str) -> tuple[Path, int]:
        if self.model_dir is None:
            raise ModelValidationError(f"{what} uses external data but the model was given as bytes")
        info = t.external
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or "\\" in loc or any(p == ".." for p in Path(loc).parts):
            raise ModelValidationError(f"{what}: external data location {loc!r} is not a file inside the model folder")
        path = (self.model_dir / loc).resolve()
        if self.model_dir not in path.parents or not path.is_file():
            raise ModelValidationError(f"{what}: external data {loc!r} is not a file inside the model folder")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise ModelValidationError(f"{what}: external data offset/length are not integers") from None
        size = path.stat().st_size
        if offset < 0 or (length is not None and length < 0):
            raise ModelValidationError(f"{what}: negative external data offset or length")
        if length is None:
            length = size - offset
        if length != nbytes:
            raise ModelValidationError(f"{what}: external data holds {length} bytes, its shape needs {nbytes}")
        if offset > size or offset + length > size:
            raise ModelValidationError(f"{what}: external data [{offset}, {offset + length}) lies beyond the end "
                                       f"of {loc} ({size} bytes)")
        return path, offset

    def check_size(self, t, count: int, what: str) -> None:
        """The stored data must have exactly the bytes (or entries) the dims say."""
        nbytes = count * _ITEMSIZE.get(t.data_type, 1)
        if t.data_location == EXTERNAL:
            self.external(t, nbytes, what)
        elif t.raw is not None:
            have = t.raw[1] - t.raw[0]
            if have != nbytes:
                raise ModelValidationError(f"{what}: raw data holds {have} bytes, its shape needs {nbytes}")
        else:
            have = t.float_count if t.data_type == FLOAT else t.int32_count()
            if have != count:
                raise ModelValidationError(f"{what}: holds {have} entries, its shape needs {count}")

    def popcount(self, t, nbytes: int, nbits: int, what: str) -> int:
        """Set bits among the first ``nbits`` of a uint8 tensor of ``nbytes`` bytes, read in chunks."""
        table = np.array([bin(i).count("1") for i in range(256)], np.int64)
        total = 0
        chunk = 1 << 24

        def count_block(block: np.ndarray, start: int) -> int:
            end = start + block.size
            full = min(end, nbits // 8)
            n = int(table[block[: max(0, full - start)]].sum()) if full > start else 0
            if start <= nbits // 8 < end and nbits % 8:
                n += bin(int(block[nbits // 8 - start]) & ((1 << (nbits % 8)) - 1)).count("1")
            return n

        if t.data_location == EXTERNAL:
            path, offset = self.external(t, nbytes, what)
            with open(path, "rb") as f:
                f.seek(offset)
                for start in range(0, nbytes, chunk):
                    block = np.frombuffer(f.read(min(chunk, nbytes - start)), np.uint8)
                    total += count_block(block, start)
            return total
        if t.raw is not None:
            data = np.frombuffer(t.buf, np.uint8, count=t.raw[1] - t.raw[0], offset=t.raw[0])
            for start in range(0, nbytes, chunk):
                total += count_block(data[start:start + chunk], start)
            return total
        start = 0
        for block in t.uint8_blocks(what):
            total += count_block(block, start)
            start += block.size
        return total


def _where(node, index: int) -> str:
    op = f"fips.{node.op_type}"
    if node.name:
        return f"{op} node {node.name!r}"
    if node.output:
        return f"{op} node (output {node.output[0]!r})"
    return f"{op} node #{index}"


def _check_graph(buf, spans, reader: _Reader, outer_consts: dict, outer_types: dict, counter: list,
                 depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ModelValidationError(f"subgraphs nested more than {MAX_DEPTH} levels deep")
    graph = _Graph(buf, spans)
    consts = dict(outer_consts)
    types = dict(outer_types)
    for name, tt in graph.value_info:
        if tt is not None:
            types[name] = tt
        else:
            types.pop(name, None)
    for t in graph.initializer:
        consts[t.name] = _Tensor(tuple(t.dims), t.data_type, t)
    for name in graph.input:  # an input shadows an initializer of the same name (it may be fed)
        consts.pop(name, None)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value" and a.t_spans:
                    t = _T(buf, a.t_spans)
                    consts[node.output[0]] = _Tensor(tuple(t.dims), t.data_type, t)
    for i, node in enumerate(graph.node):
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            counter[0] += 1
            _check_node(node, i, consts, types, reader)
        elif node.domain == DOMAIN and node.op_type == Q_OP_TYPE:
            counter[0] += 1
            _check_qnode(node, i, consts, types, reader)
        for a in node.attribute:  # subgraphs (If / Loop / Scan bodies)
            for g_spans in a.graph_spans:
                _check_graph(buf, g_spans, reader, consts, types, counter, depth + 1)


def _int_attr(node, where: str, name: str, default=None) -> int:
    found = [a for a in node.attribute if a.name == name]
    if not found:
        if default is None:
            raise ModelValidationError(f"{where}: missing attribute {name!r}")
        return default
    if len(found) > 1:
        raise ModelValidationError(f"{where}: attribute {name!r} given {len(found)} times")
    a = found[0]
    if a.type != ATTR_INT or a.ref_attr_name or a.i is None:
        raise ModelValidationError(f"{where}: attribute {name!r} must be an int")
    return int(a.i)


def _check_common(node, where: str, consts: dict, types: dict, reader: _Reader, a_name: str, m_name: str,
                  float_types: tuple) -> tuple[int, int, int, int | None]:
    """Rules 1-3 and 5 of docs/sparse-op.md (attributes, mask, A): (rows, cols, transB, kept entries or None)."""
    rows = _int_attr(node, where, "rows")
    cols = _int_attr(node, where, "cols")
    trans_b = _int_attr(node, where, "transB", 0)
    if rows < 1 or cols < 1:
        raise ModelValidationError(f"{where}: rows and cols must be >= 1 (rows={rows}, cols={cols})")
    bits = rows * cols  # Python ints: no wrap-around
    if bits > MAX_BITS:
        raise ModelValidationError(f"{where}: rows * cols = {bits} must be < 2**31 (rows={rows}, cols={cols})")
    if trans_b not in (0, 1):
        raise ModelValidationError(f"{where}: transB must be 0 or 1, got {trans_b}")
    nbytes = -(-bits // 8)
    a_t, m_t = _dtype_of(a_name, consts, types), _dtype_of(m_name, consts, types)
    if m_t is not None and m_t != UINT8:
        raise ModelValidationError(f"{where}: mask must be uint8, got {_dtype_name(m_t)}")
    if a_t is not None and a_t not in float_types:
        names = " or ".join(_dtype_name(t) for t in float_types)
        raise ModelValidationError(f"{where}: A must be {names}, got {_dtype_name(a_t)}")
    # A's rank and last dimension, where known
    k_need = cols if trans_b else rows
    a_dims = None
    if a_name in consts:
        a_dims = list(consts[a_name].dims)
    elif a_name in types and types[a_name].dims is not None:
        a_dims = list(types[a_name].dims)
    if a_dims is not None:
        if not a_dims:
            raise ModelValidationError(f"{where}: A must have at least 1 dimension")
        if a_dims[-1] is not None and a_dims[-1] != k_need:
            raise ModelValidationError(f"{where}: A has last dimension {a_dims[-1]} but rows={rows}, cols={cols}, "
                                       f"transB={trans_b} needs {k_need}")
        known = [d for d in a_dims[:-1] if d is not None]
        _count(known + [k_need if trans_b == 0 else rows, 1], f"{where}: the output")
    # mask: exactly ceil(rows*cols/8) bytes, 1-D
    kept = None
    if m_name in consts:
        m = consts[m_name]
        if len(m.dims) != 1:
            raise ModelValidationError(f"{where}: mask must be 1-D, has shape {list(m.dims)}")
        n_m = _count(m.dims, f"{where}: mask")
        if n_m != nbytes:
            raise ModelValidationError(f"{where}: mask has {n_m} bytes, rows * cols = {bits} needs exactly {nbytes}")
        reader.check_size(m.proto, n_m, f"{where}: mask")
        kept = reader.popcount(m.proto, nbytes, bits, f"{where}: mask")
    return rows, cols, trans_b, kept


def _dtype_of(name, consts, types):
    if name in consts:
        return consts[name].dtype
    t = types.get(name)
    return t.elem_type if t is not None and t.elem_type else None


def _check_node(node, index: int, consts: dict, types: dict, reader: _Reader) -> None:
    where = _where(node, index)
    if len(node.input) != 3 or len(node.output) != 1 or any(not x for x in node.input):
        raise ModelValidationError(f"{where}: needs 3 inputs (A, values, mask) and 1 output, has "
                                   f"{len(node.input)} and {len(node.output)}")
    a_name, v_name, m_name = node.input
    a_t, v_t = _dtype_of(a_name, consts, types), _dtype_of(v_name, consts, types)
    if v_t is not None and v_t not in (FLOAT, FLOAT16):
        raise ModelValidationError(f"{where}: values must be float32 or float16, got {_dtype_name(v_t)}")
    _, _, _, kept = _check_common(node, where, consts, types, reader, a_name, m_name, (FLOAT, FLOAT16))
    if a_t is not None and v_t is not None and a_t != v_t:
        raise ModelValidationError(f"{where}: A is {_dtype_name(a_t)} but values is {_dtype_name(v_t)}")
    if v_name in consts:
        v = consts[v_name]
        if len(v.dims) != 1:
            raise ModelValidationError(f"{where}: values must be 1-D, has shape {list(v.dims)}")
        n_v = _count(v.dims, f"{where}: values")
        reader.check_size(v.proto, n_v, f"{where}: values")
        if kept is not None and n_v != kept:
            raise ModelValidationError(f"{where}: values has {n_v} entries but the mask keeps {kept}")


def _check_qnode(node, index: int, consts: dict, types: dict, reader: _Reader) -> None:
    """fips.QSparseMatMul: SparseMatMul's rule (float32 A) plus bits in {4, 8}, 0 <= group_size < 2**31,
    activation_bits (optional, default 0) in {0, 8}, qvalues int8 [nnz] (bits 8) / uint8 [ceil(nnz/2)] (bits 4), scales float32 [rows or ceil(nnz/g)]."""
    where = _where(node, index)
    if len(node.input) != 4 or len(node.output) != 1 or any(not x for x in node.input):
        raise ModelValidationError(f"{where}: needs 4 inputs (A, qvalues, scales, mask) and 1 output, has "
                                   f"{len(node.input)} and {len(node.output)}")
    a_name, q_name, s_name, m_name = node.input
    qbits = _int_attr(node, where, "bits")
    group = _int_attr(node, where, "group_size")
    if qbits not in (4, 8):
        raise ModelValidationError(f"{where}: bits must be 4 or 8, got {qbits}")
    if not 0 <= group <= MAX_BITS:
        raise ModelValidationError(f"{where}: group_size must be >= 0 and < 2**31, got {group}")
    act_bits = _int_attr(node, where, "activation_bits", 0)
    if act_bits not in (0, 8):
        raise ModelValidationError(f"{where}: activation_bits must be 0 or 8, got {act_bits}")
    rows, _, _, kept = _check_common(node, where, consts, types, reader, a_name, m_name, (FLOAT,))
    q_t, s_t = _dtype_of(q_name, consts, types), _dtype_of(s_name, consts, types)
    want = INT8 if qbits == 8 else UINT8
    if q_t is not None and q_t != want:
        raise ModelValidationError(f"{where}: qvalues must be {_dtype_name(want)} for bits={qbits}, got "
                                   f"{_dtype_name(q_t)}")
    if s_t is not None and s_t != FLOAT:
        raise ModelValidationError(f"{where}: scales must be float32, got {_dtype_name(s_t)}")
    for name, what in ((q_name, "qvalues"), (s_name, "scales")):
        if name not in consts:
            continue
        t = consts[name]
        if len(t.dims) != 1:
            raise ModelValidationError(f"{where}: {what} must be 1-D, has shape {list(t.dims)}")
        n = _count(t.dims, f"{where}: {what}")
        reader.check_size(t.proto, n, f"{where}: {what}")
        if what == "qvalues" and kept is not None:
            need = kept if qbits == 8 else -(-kept // 2)
            if n != need:
                raise ModelValidationError(f"{where}: qvalues has {n} entries but the mask keeps {kept}, which needs "
                                           f"exactly {need} at bits={qbits}")
        if what == "scales" and (group == 0 or kept is not None):
            need = rows if group == 0 else -(-kept // group)
            if n != need:
                raise ModelValidationError(f"{where}: scales has {n} entries, group_size={group} with "
                                           f"{'rows=' + str(rows) if group == 0 else str(kept) + ' kept entries'} "
                                           f"needs exactly {need}")


def validate_model(path: str | os.PathLike | None = None, *, data: bytes | None = None,
                   model_dir: str | os.PathLike | None = None) -> int:
    """Check every fips.SparseMatMul node of the model at ``path`` (or the serialized ``data``).

    Returns the number of nodes checked; raises :class:`ModelValidationError` (one line) on the
    first node that breaks the rule, or when the file is not a parsable ModelProto. External
    data is looked up in ``model_dir`` (default: the file's folder; refused for ``data`` without one).
    """
    if data is not None:
        return _validate_buffer(memoryview(data), model_dir)
    if path is None:
        raise TypeError("validate_model needs a path or data")
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelValidationError(f"{path} is empty")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)  # touch the headers and the masks, not the weights around them
    except OSError as e:
        raise ModelValidationError(f"cannot read {path}: {e.strerror or e}") from None
    view = memoryview(mm)
    error = None
    try:
        n = _validate_buffer(view, path.parent if model_dir is None else model_dir)
    except ModelValidationError as e:
        error = str(e)
    # the exception (and the frames holding views of the mapping) is gone here
    try:
        view.release()
        mm.close()
    except BufferError:  # a view still alive somewhere: the mapping is closed when it is collected
        pass
    if error is not None:
        raise ModelValidationError(error)
    return n


def _validate_buffer(buf, model_dir) -> int:
    reader = _Reader(Path(model_dir) if model_dir is not None else None)
    graph_spans = [v for number, wt, v in _fields(buf, [(0, len(buf))]) if number == 7 and wt == 2]
    counter = [0]
    try:
        _check_graph(buf, graph_spans, reader, {}, {}, counter)
    except ModelValidationError:
        raise
    except RecursionError:
        raise ModelValidationError("the model's graphs are nested too deeply") from None
    except Exception as e:  # noqa: BLE001 - a malformed file must give one line, not a traceback
        raise ModelValidationError(f"malformed model ({type(e).__name__}: {e})") from None
    return counter[0]
