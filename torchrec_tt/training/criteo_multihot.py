"""MLPerf DLRM-DCNv2 multi-hot Criteo files, read without loading them.

The MLPerf recommendation benchmark (DLRM-DCNv2) trains on Criteo 1TB with multi-hot
features made by ``materialize_synthetic_multihot_dataset.py``: per day
``day_{d}_dense.npy`` (``(N, 13)`` float32, already log-scaled), ``day_{d}_labels.npy``
(``(N, 1)``) and ``day_{d}_sparse_multi_hot.npz``, an uncompressed ``np.savez`` archive
with one ``(N, hot_f)`` id array per feature, named ``"0"`` .. ``"25"``. A day's archive
is ~143 GB, so every array, the archive's members included, is memory-mapped and only
the rows of a batch are read.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.training.data import cat_feature_names, rank_share

__all__ = ["CriteoMultiHotDataset", "npz_member_memmap"]

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip member's local file header
_LOCAL_HEADER_SIGNATURE = 0x04034B50


def npz_member_memmap(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """Memory-map one array of an uncompressed ``.npz`` archive without reading it.

    Args:
        path: the ``.npz`` file (written by ``np.savez``, not ``np.savez_compressed``).
        name: the array's name in the archive.

    Returns:
        np.ndarray: a read-only ``np.memmap`` of the array.

    Raises:
        KeyError: no such array.
        ValueError: the member is compressed (it cannot be mapped).

    Example::

        >>> import tempfile
        >>> f = os.path.join(tempfile.mkdtemp(), "a.npz")
        >>> np.savez(f, x=np.arange(6).reshape(2, 3))
        >>> npz_member_memmap(f, "x")[1].tolist()
        [3, 4, 5]
    """
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(f"{name}.npy")
        except KeyError:
            raise KeyError(f"{path}: no array {name!r} (has {sorted(n[:-4] for n in archive.namelist())})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: array {name!r} is compressed and cannot be memory-mapped (write it with np.savez)")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
        if header[0] != _LOCAL_HEADER_SIGNATURE:
            raise ValueError(f"{path}: array {name!r} has a malformed zip header")
        fh.seek(info.header_offset + _LOCAL_HEADER.size + header[9] + header[10])  # name and extra fields
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fh)
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran_order else "C", offset=offset)


class CriteoMultiHotDataset(IterableDataset):
    """Batches of MLPerf multi-hot Criteo days, split across ranks.

    The training split is days ``0 .. days - 2`` in file order; the last day is split into
    halves, ``val`` then ``test`` (as torchrec's ``InMemoryBinaryCriteoIterDataPipe`` does).
    Global batch ``j`` holds the split's rows ``[j * B * W, (j + 1) * B * W)``, shared by
    the ``W`` ranks by :func:`~torchrec_tt.training.data.rank_share`. (Resuming mid-epoch is
    :func:`~torchrec_tt.training.data.make_dataset`'s, as for the other Criteo readers.) Feature ``f`` has ``hot_f`` ids per sample, hashed
    into its table by ``id % num_embeddings[f]``; its features are named ``cat_{f}``.

    Args:
        path: directory of the day files.
        days: days in ``path`` (MLPerf: 24).
        stage: ``train``, ``val`` or ``test``.
        num_embeddings: rows of each feature's table (one entry per archive array).
        batch_size: rows per batch and rank.
        rank: this rank.
        world_size: ranks.
        multi_hot_sizes: expected ids per sample of each feature (checked against the
            files; empty: whatever they hold).

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> for day in range(2):
        ...     np.save(f"{d}/day_{day}_dense.npy", np.zeros((6, 13), np.float32))
        ...     np.save(f"{d}/day_{day}_labels.npy", np.ones((6, 1), np.int32))
        ...     np.savez(f"{d}/day_{day}_sparse_multi_hot.npz", **{"0": np.arange(12).reshape(6, 2)})
        >>> batch = next(iter(CriteoMultiHotDataset(d, 2, "train", [5], batch_size=4)))
        >>> batch.sparse_features["cat_0"].values().tolist()
        [0, 1, 2, 3, 4, 0, 1, 2]
    """

    def __init__(
        self,
        path: str,
        days: int,
        stage: str,
        num_embeddings: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        multi_hot_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if stage not in ("train", "val", "test"):
            raise ValueError(f"criteo_multihot: stage must be train, val or test, got {stage!r}")
        if days < 2:
            raise ValueError(f"criteo_multihot: needs >= 2 days (training days and an evaluation day), got {days}")
        day_list = range(days - 1) if stage == "train" else [days - 1]
        names = [(f"day_{d}_dense.npy", f"day_{d}_labels.npy", f"day_{d}_sparse_multi_hot.npz") for d in day_list]
        missing = [n for group in names for n in group if not os.path.exists(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(
                f"criteo_multihot: {len(missing)} file(s) missing in {path}, e.g. {missing[0]} (expected "
                f"day_{{0..{days - 1}}}_{{dense,labels}}.npy and day_{{d}}_sparse_multi_hot.npz)"
            )
        self.num_embeddings = list(num_embeddings)
        self.keys = cat_feature_names(len(self.num_embeddings))
        self.files: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        for dense_name, labels_name, sparse_name in names:
            sparse_path = os.path.join(path, sparse_name)
            with zipfile.ZipFile(sparse_path) as archive:
                members = sorted(n[:-4] for n in archive.namelist())
            if members != sorted(str(f) for f in range(len(self.num_embeddings))):
                raise ValueError(
                    f"criteo_multihot: {sparse_name} holds arrays {members}, expected one per feature "
                    f"'0' .. '{len(self.num_embeddings) - 1}' (num_embeddings_per_feature has {len(self.num_embeddings)})"
                )
            dense = np.load(os.path.join(path, dense_name), mmap_mode="r")
            labels = np.load(os.path.join(path, labels_name), mmap_mode="r")
            sparse = [npz_member_memmap(sparse_path, str(f)) for f in range(len(self.num_embeddings))]
            rows = dense.shape[0]
            if labels.shape[0] != rows or any(s.ndim != 2 or s.shape[0] != rows for s in sparse):
                raise ValueError(
                    f"criteo_multihot: day files disagree on their rows ({dense_name}: {rows}, {labels_name}: "
                    f"{labels.shape[0]}, {sparse_name}: {[s.shape for s in sparse]})"
                )
            self.files.append((dense, labels, sparse))
        self.hot = [s.shape[1] for s in self.files[0][2]]
        for _, _, sparse in self.files[1:]:
            if [s.shape[1] for s in sparse] != self.hot:
                raise ValueError(f"criteo_multihot: ids per sample differ between days: {self.hot} and {[s.shape[1] for s in sparse]}")
        if multi_hot_sizes and list(multi_hot_sizes) != self.hot:
            raise ValueError(f"criteo_multihot: the files hold {self.hot} ids per sample, multi_hot_sizes says {list(multi_hot_sizes)}")
        starts = np.cumsum([0] + [f[0].shape[0] for f in self.files])
        self.file_starts = starts
        lo, hi = 0, int(starts[-1])
        if stage != "train":  # the last day: val is its first half, test its second
            half = hi // 2
            lo, hi = (0, half) if stage == "val" else (half, hi)
        self.lo, self.hi = lo, hi
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_batches = math.ceil((hi - lo) / (batch_size * world_size))

    def __len__(self) -> int:
        return self.num_batches

    def _rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Dense, labels and per-feature ids of the split's rows [lo, hi) (may span files)."""
        parts: list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = []
        for k, (dense, labels, sparse) in enumerate(self.files):
            a, b = max(lo, int(self.file_starts[k])), min(hi, int(self.file_starts[k + 1]))
            if a < b:
                s = slice(a - int(self.file_starts[k]), b - int(self.file_starts[k]))
                parts.append((dense[s], labels[s], [ids[s] for ids in sparse]))
        if not parts:  # an empty share of the split's last batch
            d0, l0, s0 = self.files[0]
            return d0[:0], l0[:0], [ids[:0] for ids in s0]
        dense = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        sparse = [np.concatenate([p[2][f] for p in parts]) for f in range(len(self.hot))]
        return dense, labels, sparse

    def _batch(self, lo: int, hi: int) -> Batch:
        dense, labels, sparse = self._rows(self.lo + lo, self.lo + hi)
        n = hi - lo
        values = [(ids.astype(np.int64) % size).reshape(-1) for ids, size in zip(sparse, self.num_embeddings, strict=True)]
        lengths = np.repeat(np.asarray(self.hot, dtype=np.int32), n)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=torch.from_numpy(np.concatenate(values)), lengths=torch.from_numpy(lengths)
        )
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            sparse_features=kjt,
            labels=torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1)),
        )

    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        bw = self.batch_size * self.world_size
        total = self.hi - self.lo
        for j in range(wid, self.num_batches, nworkers):
            yield self._batch(*rank_share(j * bw, min((j + 1) * bw, total), self.rank, self.world_size))
