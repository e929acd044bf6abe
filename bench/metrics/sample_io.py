"""Sample batches in the ADM contract: ``.npz`` with ``arr_0`` uint8 (N, H, W, 3), or a folder of NNNNNN.png.

Readers stream: an uncompressed ``np.savez`` member is memory-mapped straight out of the zip (random access, so
each rank reads only its own index range), a compressed one is decompressed sequentially. 50k×256² samples are
9.8 GB, so nothing here ever loads the whole array (pitfall P24). The writer produces exactly what DiT's
``np.savez(path, arr_0=samples)`` produces, streamed, in global-index order, atomically.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from bench.records.atomic import atomic_path

_PNG_NAME = re.compile(r"^(\d+)\.png$")


def validate_images(batch: np.ndarray, *, image_size: int | None = None, where: str = "samples") -> np.ndarray:
    """Check the ADM contract (uint8, NHWC, 3 channels, square if ``image_size``); return the batch."""
    if not isinstance(batch, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array, got {type(batch).__name__}")
    if batch.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 in [0, 255], got dtype {batch.dtype} "
                         "(convert model outputs with to_uint8_dit)")
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"{where}: images must be NHWC with 3 channels, got shape {batch.shape}")
    if image_size is not None and batch.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{where}: images must be {image_size}x{image_size}, got {batch.shape[1]}x{batch.shape[2]}")
    return batch


def to_uint8_dit(x) -> np.ndarray:
    """DiT's conversion of model output in [-1, 1]: clamp(127.5x + 128, 0, 255) then truncate (pitfall P17).

    It equals round-half-up of 127.5(x + 1). Accepts numpy arrays or torch tensors.
    """
    import torch

    t = torch.as_tensor(x)
    return torch.clamp(127.5 * t + 128.0, 0, 255).to(torch.uint8).cpu().numpy()


class SampleSource:
    """Common interface of the readers: ``len``, ``shape``, ``read(start, stop)`` and ``batches``."""

    path: Path
    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (global_start, uint8 NHWC batch) over [start, stop)."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"invalid range [{start}, {stop}) for {len(self)} samples")
        for a in range(start, stop, batch_size):
            b = min(a + batch_size, stop)
            yield a, self.read(a, b)

    def close(self) -> None:
        pass

    def fresh(self) -> SampleSource:
        """An independent reader of the same data (for DataLoader workers); stateless readers return self."""
        return self


def _member_data_offset(fh, info: zipfile.ZipInfo) -> int:
    """Absolute file offset of a stored member's data (after its local header, whose extra field may differ)."""
    fh.seek(info.header_offset)
    header = fh.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"corrupt zip: no local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class NpzSamples(SampleSource):
    """Streaming reader of ``arr_0`` (or ``key``) inside an ADM-style ``.npz``."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0", *, image_size: int | None = None,
                 verify: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sample file not found: {self.path}")
        self.key = key
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"{self.path} is not a readable .npz ({err}): it is truncated or not a zip file; "
                             "re-create it") from None
        names = self._zip.namelist()
        member = f"{key}.npy"
        if member not in names:
            raise ValueError(f"{self.path}: no array {key!r} in the npz (found {sorted(n[:-4] for n in names)})")
        self.extra_keys = sorted(n[:-4] for n in names if n != member)
        info = self._zip.getinfo(member)
        with self._zip.open(member) as f:
            version = npy_format.read_magic(f)
            reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            header_len = f.tell()
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        # Validate the contract on the header alone (a zero-length array of the same dtype and trailing shape).
        validate_images(np.empty((0,) + self.shape[1:] if self.shape else (0,), dtype=self.dtype),
                        image_size=image_size, where=f"{self.path} (shape {self.shape})")
        if fortran:
            raise ValueError(f"{self.path}: Fortran-order arr_0 is not supported; re-save it with np.savez")
        self.compressed = info.compress_type != zipfile.ZIP_STORED
        self._mmap = None
        if not self.compressed:
            with open(self.path, "rb") as fh:
                offset = _member_data_offset(fh, info) + header_len
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=self.shape)
        self._stream = None
        self._stream_pos = 0
        self._header_len = header_len
        self._item_bytes = int(np.prod(self.shape[1:]))
        if verify:
            self._verify_crc(member)

    def _verify_crc(self, member: str) -> None:
        """Read the member once through zipfile, which checks its CRC-32 at the end: the fast reads below (a
        memory map of the stored bytes) would otherwise score flipped bytes as if they were images."""
        try:
            with self._zip.open(member) as f:
                while f.read(1 << 24):
                    pass
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{self.path}: {member} is corrupt ({err}); re-create the file") from None

    def _read_compressed(self, start: int, stop: int) -> np.ndarray:
        if self._stream is None or start < self._stream_pos:
            if self._stream is not None:
                self._stream.close()
            self._stream = self._zip.open(f"{self.key}.npy")
            self._stream.read(self._header_len)
            self._stream_pos = 0
        while self._stream_pos < start:  # sequential skip: compressed members cannot seek cheaply
            n = min(start - self._stream_pos, 256)
            self._stream.read(n * self._item_bytes)
            self._stream_pos += n
        want = (stop - start) * self._item_bytes
        buf = self._stream.read(want)
        if len(buf) != want:
            raise ValueError(f"{self.path}: truncated arr_0 (wanted rows [{start}, {stop}))")
        self._stream_pos = stop
        return np.frombuffer(buf, dtype=np.uint8).reshape((stop - start,) + self.shape[1:])

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"invalid range [{start}, {stop}) for {len(self)} samples")
        if self._mmap is not None:
            return np.array(self._mmap[start:stop])
        return self._read_compressed(start, stop)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._mmap = None
        self._zip.close()

    def fresh(self) -> NpzSamples:
        # A forked worker must not share the zip file handle (and its offset) with its parent; the parent verified.
        return NpzSamples(self.path, self.key, verify=False)

    def __getstate__(self):
        return {"path": self.path, "key": self.key}

    def __setstate__(self, state):
        self.__init__(state["path"], state["key"], verify=False)


class PngFolderSamples(SampleSource):
    """Reader of DiT's sample folder: ``000000.png`` … in integer index order, which must be 0..N-1."""

    def __init__(self, path: str | os.PathLike, *, image_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"sample folder not found: {self.path}")
        indexed = []
        for name in os.listdir(self.path):
            m = _PNG_NAME.match(name)
            if m:
                indexed.append((int(m.group(1)), name))
        if not indexed:
            raise ValueError(f"{self.path}: no NNNNNN.png files")
        indexed.sort()
        if [i for i, _ in indexed] != list(range(len(indexed))):
            raise ValueError(f"{self.path}: PNG indices are not exactly 0..{len(indexed) - 1} "
                             "(missing or extra files)")
        self.files = [self.path / name for _, name in indexed]
        first = self._load(0)
        self.shape = (len(self.files),) + first.shape
        validate_images(first[None], image_size=image_size, where=str(self.files[0]))

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            if im.mode != "RGB":
                raise ValueError(f"{self.files[i]}: PNG mode {im.mode}, expected RGB")
            return np.asarray(im, dtype=np.uint8)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.stack([self._load(i) for i in range(start, stop)]) if stop > start else \
            np.empty((0,) + self.shape[1:], np.uint8)
        return validate_images(out, where=str(self.path)) if len(out) else out


def open_samples(path: str | os.PathLike, *, image_size: int | None = None) -> SampleSource:
    """Open an ADM ``.npz`` or a PNG folder."""
    p = Path(path)
    if p.is_dir():
        return PngFolderSamples(p, image_size=image_size)
    if p.suffix == ".npz":
        return NpzSamples(p, image_size=image_size)
    if not p.exists():
        raise FileNotFoundError(f"samples not found: {p}")
    raise ValueError(f"{p}: samples must be an ADM-style .npz (arr_0) or a folder of NNNNNN.png")


def write_samples_npz(path: str | os.PathLike, batches: Iterable[np.ndarray], n: int, *,
                      compress: bool = False) -> Path:
    """Write ``n`` images, given as uint8 NHWC batches in global-index order, as ``np.savez(path, arr_0=...)``.

    The member is streamed (never the whole array in memory) into a temp file renamed into place at the end.
    """
    path = Path(path)
    batches = iter(batches)
    first = validate_images(next(batches), where="first batch")
    shape = (n,) + first.shape[1:]
    header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    written = 0
    with atomic_path(path) as tmp:
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as member:
                npy_format.write_array_header_1_0(member, header)  # the header np.save writes for this shape
                for batch in _chain(first, batches):
                    validate_images(batch, image_size=None, where="batch")
                    if batch.shape[1:] != shape[1:]:
                        raise ValueError(f"batch of shape {batch.shape[1:]} differs from the first {shape[1:]}")
                    member.write(np.ascontiguousarray(batch).tobytes())
                    written += len(batch)
        if written != n:
            raise ValueError(f"wrote {written} images, expected {n}")
    return path


def _chain(first, rest):
    yield first
    yield from rest


def png_folder_to_npz(folder: str | os.PathLike, out: str | os.PathLike, batch_size: int = 256) -> Path:
    """DiT's ``create_npz_from_sample_folder``, streamed: PNGs in index order → ``arr_0``."""
    src = PngFolderSamples(folder)
    return write_samples_npz(out, (b for _, b in src.batches(batch_size)), len(src))
