"""The part of ONNX's protobuf format the exporter writes, encoded by hand, so that exporting
(and `edgert bench --synthetic`, which builds a model on the device) needs no `onnx` package.

Messages keep protobuf's proto2 rules as onnx.helper uses them: a scalar field is written when
it was set, even to its default (None = unset); repeated scalars are not packed (onnx.proto
declares no `packed` on dims/ints/floats); fields go out in field-number order. With the same
helper calls this gives byte-identical files (tests/test_onnx_proto.py checks it against onnx).
The helpers mimic the onnx.helper / numpy_helper names the graph code calls.
"""
from __future__ import annotations

import numbers
import struct
import types

import numpy as np

# ---- wire format ----------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1                   # negative int64: ten bytes of two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _encode(number: int, kind: str, value) -> bytes:
    if kind == "int":
        return _varint(number << 3) + _varint(int(value))
    if kind == "float":
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if kind == "str":
        value = value.encode() if isinstance(value, str) else bytes(value)
    elif kind == "msg":
        value = value.SerializeToString()
    return _varint(number << 3 | 2) + _varint(len(value)) + value


class _Repeated(list):
    """A repeated field; `add(**fields)` appends a new message, as protobuf's containers do."""

    def __init__(self, element=None, items=()):
        super().__init__(items)
        self._element = element

    def add(self, **fields):
        self.append(self._element(**fields))
        return self[-1]

    def extend(self, items):
        super().extend(list(items))


class _Message:
    # (field number, attribute, kind, repeated); kind: int, float, str (str or bytes), msg, or a
    # message class for repeated messages
    FIELDS: tuple = ()

    def __init__(self, **fields):
        for _, attr, kind, repeated in self.FIELDS:
            if repeated:
                object.__setattr__(self, attr, _Repeated(kind if isinstance(kind, type) else None))
            else:
                object.__setattr__(self, attr, None)
        for attr, value in fields.items():
            if attr not in self._attrs():
                raise AttributeError(f"{type(self).__name__} has no field {attr!r}")
            if isinstance(getattr(self, attr), _Repeated):
                getattr(self, attr).extend(value)
            else:
                setattr(self, attr, value)

    @classmethod
    def _attrs(cls):
        return {attr for _, attr, _, _ in cls.FIELDS}

    def __setattr__(self, attr, value):
        if attr not in self._attrs():
            raise AttributeError(f"{type(self).__name__} has no field {attr!r}")
        object.__setattr__(self, attr, value)

    def SerializeToString(self) -> bytes:
        out = []
        for number, attr, kind, repeated in sorted(self.FIELDS):
            value = getattr(self, attr)
            kind = "msg" if isinstance(kind, type) else kind
            if repeated:
                out.extend(_encode(number, kind, v) for v in value)
            elif value is not None:
                out.append(_encode(number, kind, value))
        return b"".join(out)

    def __eq__(self, other):
        return type(other) is type(self) and self.SerializeToString() == other.SerializeToString()


def _message(name: str, *fields) -> type:
    return type(name, (_Message,), {"FIELDS": fields})


# ---- messages (field numbers from onnx.proto) -----------------------------------------------

StringStringEntryProto = _message("StringStringEntryProto", (1, "key", "str", False), (2, "value", "str", False))
OperatorSetIdProto = _message("OperatorSetIdProto", (1, "domain", "str", False), (2, "version", "int", False))


class TensorProto(_Message):
    FIELDS = ((1, "dims", "int", True), (2, "data_type", "int", False), (8, "name", "str", False),
              (9, "raw_data", "str", False), (13, "external_data", StringStringEntryProto, True),
              (14, "data_location", "int", False))
    # DataType and DataLocation values
    FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL, FLOAT16, DOUBLE, UINT32, UINT64 = range(1, 14)
    BFLOAT16 = 16
    DEFAULT, EXTERNAL = 0, 1


Dimension = _message("Dimension", (1, "dim_value", "int", False), (2, "dim_param", "str", False))
TensorShapeProto = _message("TensorShapeProto", (1, "dim", Dimension, True))
TensorTypeProto = _message("TensorTypeProto", (1, "elem_type", "int", False), (2, "shape", "msg", False))
TypeProto = _message("TypeProto", (1, "tensor_type", "msg", False))
ValueInfoProto = _message("ValueInfoProto", (1, "name", "str", False), (2, "type", "msg", False))


class AttributeProto(_Message):
    FIELDS = ((1, "name", "str", False), (2, "f", "float", False), (3, "i", "int", False), (4, "s", "str", False),
              (5, "t", "msg", False), (6, "g", "msg", False), (7, "floats", "float", True), (8, "ints", "int", True),
              (9, "strings", "str", True), (20, "type", "int", False))
    FLOAT, INT, STRING, TENSOR, GRAPH, FLOATS, INTS, STRINGS = range(1, 9)


NodeProto = _message("NodeProto", (1, "input", "str", True), (2, "output", "str", True), (3, "name", "str", False),
                     (4, "op_type", "str", False), (5, "attribute", AttributeProto, True), (7, "domain", "str", False))
GraphProto = _message("GraphProto", (1, "node", NodeProto, True), (2, "name", "str", False),
                      (5, "initializer", TensorProto, True), (11, "input", ValueInfoProto, True),
                      (12, "output", ValueInfoProto, True))
ModelProto = _message("ModelProto", (1, "ir_version", "int", False), (2, "producer_name", "str", False),
                      (3, "producer_version", "str", False), (7, "graph", "msg", False),
                      (8, "opset_import", OperatorSetIdProto, True), (14, "metadata_props", StringStringEntryProto, True))


# ---- onnx.helper / numpy_helper look-alikes -------------------------------------------------

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint16): TensorProto.UINT16,
               np.dtype(np.int16): TensorProto.INT16, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL,
               np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.float64): TensorProto.DOUBLE,
               np.dtype(np.uint32): TensorProto.UINT32, np.dtype(np.uint64): TensorProto.UINT64}


def np_dtype_to_tensor_dtype(dtype) -> int:
    try:
        return _NP_TO_ONNX[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"no ONNX tensor type for numpy {np.dtype(dtype)}") from None


def from_array(array: np.ndarray, name: str | None = None) -> TensorProto:
    array = np.asarray(array)
    t = TensorProto(dims=array.shape)
    if name:
        t.name = name
    t.data_type = np_dtype_to_tensor_dtype(array.dtype)
    t.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return t


def make_attribute(key: str, value) -> AttributeProto:
    a = AttributeProto(name=key)
    if isinstance(value, numbers.Integral):
        a.i, a.type = int(value), AttributeProto.INT
    elif isinstance(value, numbers.Real):
        a.f, a.type = float(value), AttributeProto.FLOAT
    elif isinstance(value, (str, bytes)):
        a.s, a.type = value, AttributeProto.STRING
    elif isinstance(value, TensorProto):
        a.t, a.type = value, AttributeProto.TENSOR
    elif isinstance(value, GraphProto):
        a.g, a.type = value, AttributeProto.GRAPH
    else:
        value = list(value)
        if value and all(isinstance(v, numbers.Integral) for v in value):
            a.ints.extend(int(v) for v in value)
            a.type = AttributeProto.INTS
        elif value and all(isinstance(v, numbers.Real) for v in value):
            a.floats.extend(float(v) for v in value)
            a.type = AttributeProto.FLOATS
        elif value and all(isinstance(v, (str, bytes)) for v in value):
            a.strings.extend(value)
            a.type = AttributeProto.STRINGS
        else:
            raise ValueError(f"attribute {key}: cannot encode {value!r}")
    return a


def make_node(op_type: str, inputs, outputs, name: str | None = None, domain: str | None = None, **attrs) -> NodeProto:
    node = NodeProto(op_type=op_type, input=inputs, output=outputs)
    if name:
        node.name = name
    if domain is not None:
        node.domain = domain
    node.attribute.extend(make_attribute(k, v) for k, v in sorted(attrs.items()) if v is not None)
    return node


def make_tensor_value_info(name: str, elem_type: int, shape) -> ValueInfoProto:
    """shape None: unknown rank; [] a scalar; ints are fixed sizes, strings symbolic ones."""
    tensor = TensorTypeProto(elem_type=elem_type)
    if shape is not None:
        tensor.shape = TensorShapeProto(dim=[Dimension(dim_value=d) if isinstance(d, int) else Dimension(dim_param=d)
                                             for d in shape])
    return ValueInfoProto(name=name, type=TypeProto(tensor_type=tensor))


def make_graph(nodes, name: str, inputs, outputs, initializer=()) -> GraphProto:
    return GraphProto(node=nodes, name=name, input=inputs, output=outputs, initializer=initializer)


def make_opsetid(domain: str, version: int) -> OperatorSetIdProto:
    return OperatorSetIdProto(domain=domain, version=version)


def make_model(graph: GraphProto, opset_imports=(), **fields) -> ModelProto:
    return ModelProto(graph=graph, opset_import=opset_imports, **fields)


def set_model_props(model: ModelProto, props: dict) -> None:
    model.metadata_props = [StringStringEntryProto(key=k, value=v) for k, v in props.items()]


def save_model(model: ModelProto, path) -> None:
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


# the namespaces graph code reads these from, as with `from onnx import helper, numpy_helper`
helper = types.SimpleNamespace(make_node=make_node, make_attribute=make_attribute, make_graph=make_graph,
                               make_model=make_model, make_opsetid=make_opsetid, set_model_props=set_model_props,
                               make_tensor_value_info=make_tensor_value_info,
                               np_dtype_to_tensor_dtype=np_dtype_to_tensor_dtype)
numpy_helper = types.SimpleNamespace(from_array=from_array)
