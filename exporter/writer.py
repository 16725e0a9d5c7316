"""Atomic writing of an export: the .onnx, its external data (when used) and the sidecar files.

Everything is first written into a private temporary folder beside the output (same file system),
under its final names, so ``onnx.checker.check_model(path)`` sees the real layout (external data is
found relative to the model). Then the files are renamed into place with ``os.replace``: the
external data first, the sidecars, the .onnx last; a reader never sees an .onnx whose data is missing.
Temporaries that killed runs left (``fips_rt.tempfiles``: their PID is gone) are removed first.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from fips_rt.errors import FipsError
from fips_rt.tempfiles import remove_stale_temporaries, temp_path

PROTOBUF_LIMIT = 2 ** 31 - 1
AUTO_EXTERNAL_BYTES = 1_800_000_000  # leave room for the graph itself under protobuf's 2 GiB
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the .onnx
ALIGN = 4096  # page-aligned offsets: onnxruntime can map them instead of copying


@dataclass
class Written:
    model: Path
    data: Path | None
    sidecars: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.model] + ([self.data] if self.data else []) + self.sidecars

    @property
    def bytes_on_disk(self) -> int:
        return self.model.stat().st_size + (self.data.stat().st_size if self.data else 0)


def initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in proto.graph.initializer)


def data_file_name(model_path: Path) -> str:
    return model_path.name + ".data"


def _externalize(proto: onnx.ModelProto, data_path: Path) -> None:
    """Move every initializer of >= 1 KiB into ``data_path`` (page-aligned), in place."""
    location = data_path.name
    offset = 0
    with open(data_path, "wb") as f:
        for t in proto.graph.initializer:
            if not t.raw_data or len(t.raw_data) < EXTERNAL_MIN_BYTES:
                continue
            pad = (-offset) % ALIGN
            if pad:
                f.write(b"\0" * pad)
                offset += pad
            f.write(t.raw_data)
            length = len(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            offset += length
        f.flush()
        os.fsync(f.fileno())


def write_export(proto: onnx.ModelProto, out: Path, *, external_data: bool | None,
                 sidecars: dict[str, bytes]) -> Written:
    """Check and write ``proto`` to ``out`` (+ ``out.name + '.data'``) and ``sidecars`` beside it, atomically.

    ``external_data``: True / False to force, None = only when the weights exceed what one protobuf holds.
    Note: externalizing moves the tensor bytes out of ``proto`` (it is modified in place).
    """
    out = Path(out)
    use_external = external_data if external_data is not None else initializer_bytes(proto) > AUTO_EXTERNAL_BYTES
    if not use_external and proto.ByteSize() >= PROTOBUF_LIMIT:
        raise FipsError(f"The model needs {proto.ByteSize() / 2**30:.2f} GiB, more than one .onnx file can hold; "
                        f"export with external data (leave the external-data option on auto).")
    remove_stale_temporaries(out)  # left by a killed earlier run
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        data_tmp = None
        if use_external:
            data_tmp = tmp / data_file_name(out)
            _externalize(proto, data_tmp)
        model_tmp = tmp / out.name
        blob = proto.SerializeToString()
        with open(model_tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        del blob
        onnx.checker.check_model(str(model_tmp))  # path form: works for big files and external data
        side_tmp = []
        for name, content in sidecars.items():
            p = tmp / name
            p.write_bytes(content)
            side_tmp.append(p)
        # install: data first, sidecars, the model last
        data_final = None
        if data_tmp is not None:
            data_final = out.parent / data_tmp.name
            os.replace(data_tmp, data_final)
        finals = []
        for p in side_tmp:
            os.replace(p, out.parent / p.name)
            finals.append(out.parent / p.name)
        os.replace(model_tmp, out)
        stale = out.parent / data_file_name(out)
        if data_final is None and stale.exists():  # data of a previous export under the same name
            stale.unlink()
        return Written(out, data_final, finals)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
