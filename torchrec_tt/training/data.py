"""Data for the DLRM job: synthetic Criteo-like stream, real Criteo files, MovieLens-100k.

Every loader yields torchrec ``Batch`` objects (``dense_features``, a
``KeyedJaggedTensor`` of ``sparse_features``, ``labels``) for *one rank*, and every
rank of a job gets the **same number of batches** per pass (collectives in the
sharded model would hang otherwise). Each loader can start at a given batch index,
which is how a resumed run continues exactly where its checkpoint left off.

* :class:`SyntheticCriteoDataset` (default): power-law ids at the configured
  cardinalities, a planted logit (per-id effects, pairwise id interactions, a
  dense linear term) so that AUC measures learning; batch ``i`` of rank ``r`` is a
  pure function of ``(seed, stage, i * world_size + r)``, hence free to regenerate.
* ``criteo_npy``: torchrec's ``InMemoryBinaryCriteoIterDataPipe`` over the
  ``day_{i}_{dense,sparse,labels}.npy`` files of torchrec's preprocessing scripts.
* ``criteo_tsv``: torchrec's ``criteo_kaggle`` / ``criteo_terabyte`` TSV datapipes,
  categorical hex values hashed into the table sizes.
* ``movielens100k``: read from the recbole 1.2.1 wheel (``recbole/dataset_example/
  ml-100k``), fetched from PyPI with ``pip download`` on first use; CTR task
  ``rating >= 4``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_tt.training.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "MOVIELENS_FEATURES",
    "InMemoryRecDataset",
    "MovieLens100k",
    "SyntheticCriteoDataset",
    "cat_feature_names",
    "fetch_recbole_wheel",
    "load_movielens100k",
    "make_dataloader",
    "prepare_data",
    "table_sizes",
]

STAGES = ("train", "val", "test")
_MASK32 = 0xFFFFFFFF
RECBOLE_VERSION = "1.2.1"
_ML_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


def cat_feature_names(num: int) -> list[str]:
    """The Criteo feature names of torchrec, ``cat_0 .. cat_{num-1}``."""
    return [f"cat_{i}" for i in range(num)]


# ----------------------------------------------------------------------------- hashing
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (int64 tensors holding values in ``[0, 2**32)``), no overflow."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def _salt(*parts: int | str) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _hash_unit(ids: torch.Tensor, salt: int) -> torch.Tensor:
    """Deterministic pseudo-random value per id, uniform with mean 0 and variance 1."""
    h = _hash32((ids * 0x9E3779B1 + salt) & _MASK32)
    return (h.float() * (1.0 / 4294967296.0) - 0.5) * math.sqrt(12.0)


def _coprime_multiplier(n: int, salt: int) -> int:
    """A multiplier ``a`` with ``gcd(a, n) == 1`` so that ``i -> (a*i + c) % n`` is a bijection."""
    a = (salt | 1) % max(n, 2) or 1
    while math.gcd(a, n) != 1:
        a += 1
    return a


# ----------------------------------------------------------------------------- synthetic
class SyntheticCriteoDataset(IterableDataset):
    """Criteo-like synthetic click data with a planted, learnable signal.

    Ids: feature ``f`` draws ranks from a bounded power law ``P(k) ~ k^-zipf_alpha`` over
    its ``N_f`` rows, then maps them through a fixed random bijection of ``[0, N_f)``
    (hot ids are scattered, as in real preprocessed Criteo). Multi-hot features draw
    ``multi_hot_sizes[f]`` ids per sample.

    Labels: ``y ~ Bernoulli(sigmoid(bias + signal_scale * s))`` with
    ``s = 0.5 * dense @ w + main + 0.8 * inter``, where ``main`` is a sum over features of a
    fixed pseudo-random effect of each id (mean over a sample's ids), ``inter`` a sum of
    dot products of 4-d pseudo-random id vectors over 13 fixed feature pairs, each term
    scaled to unit variance, and the bias gives about 25 % positives (Criteo's rate).
    Id effects are computed by hashing, so even 40M-row tables need no memory.

    Units: unit ``u`` of a stage is ``batch_size`` samples generated from
    ``(seed, stage, u)``. Training batch ``i`` of rank ``r`` is unit ``i * world_size + r``
    (so the global stream is the same for every world size); the evaluation split is
    ``ceil(eval_samples / (batch_size * world_size))`` units per rank.

    Args:
        num_embeddings_per_feature (list[int]): table sizes (one feature per table).
        batch_size (int): samples per batch (per rank).
        num_dense (int): dense features.
        stage (str): ``train``, ``val`` or ``test`` (independent streams).
        rank (int): this rank.
        world_size (int): ranks.
        multi_hot_sizes (list[int], optional): ids per sample and feature (default 1).
        zipf_alpha (float): power-law exponent.
        signal_scale (float): scale of the planted logit.
        seed (int): generator seed.
        eval_samples (int): size of the ``val``/``test`` split (all ranks together).
        start_batch (int): first batch index to yield (resume).
        feature_names (list[str], optional): default ``cat_0 ..``.
        pool_batches (int): training only: pre-generate this many batches and cycle through
            them (batch ``i`` is pool entry ``i % pool_batches``); 0 = fresh batches.

    Example::

        >>> ds = SyntheticCriteoDataset([1000, 50], batch_size=4, num_dense=3)
        >>> b = next(iter(ds))
        >>> b.dense_features.shape, b.sparse_features.keys(), b.labels.shape
        (torch.Size([4, 3]), ['cat_0', 'cat_1'], torch.Size([4]))
    """

    NUM_PAIRS = 13
    LATENT_DIM = 4

    def __init__(
        self,
        num_embeddings_per_feature: Sequence[int],
        batch_size: int,
        num_dense: int = 13,
        stage: str = "train",
        rank: int = 0,
        world_size: int = 1,
        multi_hot_sizes: Sequence[int] | None = None,
        zipf_alpha: float = 1.1,
        signal_scale: float = 1.0,
        seed: int = 0,
        eval_samples: int = 65536,
        start_batch: int = 0,
        feature_names: Sequence[str] | None = None,
        pool_batches: int = 0,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.sizes = [int(n) for n in num_embeddings_per_feature]
        self.keys = list(feature_names) if feature_names is not None else cat_feature_names(len(self.sizes))
        self.hots = [int(h) for h in multi_hot_sizes] if multi_hot_sizes else [1] * len(self.sizes)
        self.batch_size, self.num_dense, self.stage = batch_size, num_dense, stage
        self.rank, self.world_size = rank, world_size
        self.zipf_alpha, self.signal_scale, self.seed = zipf_alpha, signal_scale, seed
        self.start_batch = start_batch
        self.pool_batches = pool_batches if stage == "train" else 0
        self._pool: list[Batch] | None = None
        self.num_batches: int | None = None
        if stage != "train":
            self.num_batches = max(1, math.ceil(eval_samples / (batch_size * world_size)))
        # Fixed structure of the generative model (same for every stage and rank).
        g = torch.Generator().manual_seed(_salt("structure", seed))
        num_f = len(self.sizes)
        self._mult = [_coprime_multiplier(n, _salt("mult", seed, f)) for f, n in enumerate(self.sizes)]
        self._shift = [_salt("shift", seed, f) % n for f, n in enumerate(self.sizes)]
        self._main_salt = [_salt("main", seed, f) for f in range(num_f)]
        self._latent_salt = [[_salt("latent", seed, f, k) for k in range(self.LATENT_DIM)] for f in range(num_f)]
        self._dense_w = torch.randn(num_dense, generator=g) / math.sqrt(max(num_dense, 1))
        self._main_w = torch.randn(num_f, generator=g).abs() + 0.5
        self._main_w /= self._main_w.norm()
        pairs = torch.randperm(num_f * num_f, generator=g).tolist()
        self._pairs = [(p // num_f, p % num_f) for p in pairs if p // num_f < p % num_f][: self.NUM_PAIRS]
        # Bias for ~25 % positives: logit std is about signal_scale * 1.3.
        self._bias = -1.1 - 0.35 * signal_scale**2

    # -- generation
    def _unit_generator(self, unit: int) -> torch.Generator:
        return torch.Generator().manual_seed(_salt(self.seed, self.stage, unit))

    def _power_law_ranks(self, n: int, count: int, g: torch.Generator) -> torch.Tensor:
        u = torch.rand(count, generator=g, dtype=torch.float64)
        a = self.zipf_alpha
        if abs(a - 1.0) < 1e-9:
            x = torch.exp(u * math.log(n + 1.0))
        else:  # inverse CDF of p(x) ~ x^-a on [1, n+1)
            x = ((math.pow(n + 1.0, 1.0 - a) - 1.0) * u + 1.0) ** (1.0 / (1.0 - a))
        return (x.floor().long() - 1).clamp_(0, n - 1)

    def sample_ids(self, f: int, count: int, g: torch.Generator) -> torch.Tensor:
        """``count`` ids of feature ``f`` (power law over ranks, scattered by a bijection)."""
        n = self.sizes[f]
        return (self._power_law_ranks(n, count, g) * self._mult[f] + self._shift[f]) % n

    def planted_logit(self, dense: torch.Tensor, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """The true logit of each sample (``ids[f]`` is ``(B, hots[f])``); its AUC is the ceiling."""
        main = torch.zeros(dense.shape[0])
        latents = {}
        for f, idf in enumerate(ids):
            main += self._main_w[f] * _hash_unit(idf, self._main_salt[f]).mean(dim=1)
        for f in {x for pair in self._pairs for x in pair}:
            z = torch.stack([_hash_unit(ids[f], s).mean(dim=1) for s in self._latent_salt[f]], dim=1)
            latents[f] = z * math.sqrt(ids[f].shape[1])  # unit variance per coordinate
        inter = torch.zeros(dense.shape[0])
        for f, h in self._pairs:
            inter += (latents[f] * latents[h]).sum(dim=1)
        inter /= math.sqrt(max(len(self._pairs), 1) * self.LATENT_DIM)
        s = 0.5 * (dense @ self._dense_w) + main + 0.8 * inter
        return self._bias + self.signal_scale * s

    def generate(self, unit: int) -> tuple[Batch, torch.Tensor]:
        """Unit ``unit`` of this stage: ``(batch, planted logits)``."""
        g = self._unit_generator(unit)
        b = self.batch_size
        dense = torch.randn(b, self.num_dense, generator=g)
        ids = [self.sample_ids(f, b * h, g).view(b, h) for f, h in enumerate(self.hots)]
        logit = self.planted_logit(dense, ids)
        labels = (torch.rand(b, generator=g) < torch.sigmoid(logit)).float()
        values = torch.cat([i.reshape(-1) for i in ids])
        lengths = torch.cat([torch.full((b,), h, dtype=torch.int32) for h in self.hots])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        return Batch(dense_features=dense, sparse_features=kjt, labels=labels), logit

    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        stop = self.num_batches
        indices = itertools.count(self.start_batch) if stop is None else range(self.start_batch, stop)
        if self.pool_batches and self._pool is None:
            self._pool = [self.generate(i * self.world_size + self.rank)[0] for i in range(self.pool_batches)]
        for i in itertools.islice(indices, wid, None, nworkers):
            if self._pool is not None:
                yield self._pool[i % self.pool_batches]
            else:
                yield self.generate(i * self.world_size + self.rank)[0]

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("the training stream is infinite")
        return self.num_batches - self.start_batch


# ----------------------------------------------------------------------------- in-memory data
def rank_share(first: int, last: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s part ``[a, b)`` of the rows ``[first, last)`` of one global batch.

    The parts are as even as possible (sizes differ by at most one row), so every rank
    yields the same number of batches and the collectives stay matched.

    Example::

        >>> [rank_share(0, 10, r, 3) for r in range(3)]
        [(0, 3), (3, 7), (7, 10)]
    """
    bounds = np.linspace(first, last, world_size + 1).round().astype(np.int64)
    return int(bounds[rank]), int(bounds[rank + 1])


def _gather_index(offsets: np.ndarray, lengths: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in a jagged column's values of the given rows' ids, in row order."""
    ln = lengths[rows].astype(np.int64)
    starts = offsets[rows]
    return np.repeat(starts - np.concatenate([[0], np.cumsum(ln)[:-1]]), ln) + np.arange(int(ln.sum()))


@dataclass
class _SparseColumn:
    values: np.ndarray  # int64 ids
    lengths: np.ndarray  # int32 ids per row


class InMemoryRecDataset(IterableDataset):
    """Rows held in memory (dense, jagged sparse features, labels), split across ranks.

    Every rank yields ``ceil(rows / (batch_size * world_size))`` batches per pass (the
    last ones may be smaller, and differ by at most one row across ranks), so
    collectives stay matched. The training split is reshuffled every epoch from
    ``seed + epoch``, identically on all ranks.

    Args:
        dense (np.ndarray): ``(N, num_dense)`` float32.
        sparse (dict[str, tuple[np.ndarray, np.ndarray]]): feature -> ``(values, lengths)``.
        labels (np.ndarray): ``(N,)`` 0/1.
        batch_size (int): rows per batch (per rank).
        rank (int): this rank.
        world_size (int): ranks.
        shuffle (bool): reshuffle rows every epoch.
        seed (int): shuffle seed.
        epochs (int): passes; ``None`` = forever.
        start_batch (int): global batch index (over epochs) to start from (resume).

    Example::

        >>> ds = InMemoryRecDataset(
        ...     np.zeros((5, 2), np.float32), {"f": (np.arange(5), np.ones(5, np.int32))}, np.ones(5), 2, shuffle=False
        ... )
        >>> [b.labels.numel() for b in ds]
        [2, 2, 1]
    """

    def __init__(
        self,
        dense: np.ndarray,
        sparse: dict[str, tuple[np.ndarray, np.ndarray]],
        labels: np.ndarray,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int | None = 1,
        start_batch: int = 0,
    ) -> None:
        super().__init__()
        self.num_rows = int(labels.shape[0])
        if self.num_rows == 0:
            raise ValueError("empty dataset")
        self.dense = np.ascontiguousarray(dense, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.float32)
        self.keys = list(sparse)
        self.columns = {k: _SparseColumn(np.asarray(v, np.int64), np.asarray(ln, np.int32)) for k, (v, ln) in sparse.items()}
        self.offsets = {k: np.concatenate([[0], np.cumsum(c.lengths)]) for k, c in self.columns.items()}
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.epochs, self.start_batch = shuffle, seed, epochs, start_batch
        self.batches_per_epoch = math.ceil(self.num_rows / (batch_size * world_size))

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("infinite dataset")
        return self.batches_per_epoch * self.epochs - self.start_batch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Row order of an epoch; global batch ``j`` is ``order[j*B*W : (j+1)*B*W]``."""
        if self.shuffle:
            return np.random.default_rng(self.seed + epoch).permutation(self.num_rows)
        return np.arange(self.num_rows)

    def _batch(self, rows: np.ndarray) -> Batch:
        values, lengths = [], []
        for k in self.keys:
            col = self.columns[k]
            values.append(col.values[_gather_index(self.offsets[k], col.lengths, rows)])
            lengths.append(col.lengths[rows])
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)),
        )
        return Batch(
            dense_features=torch.from_numpy(self.dense[rows]),
            sparse_features=kjt,
            labels=torch.from_numpy(self.labels[rows]),
        )

    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        wid, nworkers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        bw = self.batch_size * self.world_size
        epochs = range(self.epochs) if self.epochs is not None else itertools.count()
        for epoch in epochs:
            if (epoch + 1) * self.batches_per_epoch <= self.start_batch:
                continue
            order = self._epoch_order(epoch)
            for j in range(self.batches_per_epoch):
                global_index = epoch * self.batches_per_epoch + j
                if global_index < self.start_batch or (global_index - self.start_batch) % nworkers != wid:
                    continue
                chunk = order[j * bw : (j + 1) * bw]
                a, b = rank_share(0, len(chunk), self.rank, self.world_size)
                rows = chunk[a:b]
                yield self._batch(rows)


# ----------------------------------------------------------------------------- MovieLens-100k
#: Sparse features of the MovieLens-100k CTR task, in order.
MOVIELENS_FEATURES = ["user_id", "item_id", "age", "gender", "occupation", "zip_code", "release_year", "genre"]
MOVIELENS_DENSE = ["age", "release_year", "timestamp"]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torchrec_tt"


def fetch_recbole_wheel(cache_dir: str | Path | None = None, timeout: float = 300.0) -> Path:
    """Return the recbole 1.2.1 wheel (it ships ml-100k), downloading it with pip if needed.

    Runs ``python -m pip download recbole==1.2.1 --no-deps -d <cache_dir>``; the data is
    read from the wheel, never unpacked into the repository.

    Args:
        cache_dir (str or Path, optional): default ``~/.cache/torchrec_tt``.
        timeout (float): seconds allowed for pip.

    Returns:
        Path: the ``.whl`` file.

    Raises:
        RuntimeError: if pip fails (e.g. PyPI unreachable), with pip's output.
    """
    cache = Path(cache_dir) if cache_dir else _default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"recbole-{RECBOLE_VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", f"recbole=={RECBOLE_VERSION}", "--no-deps", "-q", "-d", str(cache)]
    logger.info("fetching MovieLens-100k (recbole %s wheel, ~2 MB): %s", RECBOLE_VERSION, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"pip download recbole=={RECBOLE_VERSION} timed out after {timeout}s") from e
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"pip download recbole=={RECBOLE_VERSION} failed (rc={proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return found[0]


def _read_atomic(source: Path, kind: str) -> list[list[str]]:
    """Rows of a recbole atomic file (``ml-100k.inter`` / ``.user`` / ``.item``), header dropped."""
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            text = z.read(_ML_MEMBER.format(kind)).decode("latin-1")
    else:
        text = (source / f"ml-100k.{kind}").read_text(encoding="latin-1")
    lines = text.splitlines()
    return [line.split("\t") for line in lines[1:] if line]


@dataclass
class MovieLens100k:
    """MovieLens-100k as a CTR data set (label: rating >= 4), all rows, unsplit.

    Attributes:
        dense (np.ndarray): ``(N, 3)``: age, release year, timestamp (each scaled to ~[0, 1]).
        sparse (dict): feature -> ``(values, lengths)``; ``genre`` is multi-hot.
        labels (np.ndarray): ``(N,)``.
        num_embeddings (dict[str, int]): rows of each feature's table.
    """

    dense: np.ndarray
    sparse: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    num_embeddings: dict[str, int]

    def split(self, seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, np.ndarray]:
        """Random row split ``train/val/test`` (80/10/10 by default) from ``seed``."""
        order = np.random.default_rng(seed).permutation(self.labels.shape[0])
        a = int(fractions[0] * len(order))
        b = a + int(fractions[1] * len(order))
        return {"train": np.sort(order[:a]), "val": np.sort(order[a:b]), "test": np.sort(order[b:])}

    def subset(self, rows: np.ndarray) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """``(dense, sparse, labels)`` of the given rows."""
        sparse = {}
        for k, (values, lengths) in self.sparse.items():
            sparse[k] = (values[_gather_index(np.concatenate([[0], np.cumsum(lengths)]), lengths, rows)], lengths[rows])
        return self.dense[rows], sparse, self.labels[rows]


def load_movielens100k(source: str | Path | None = None, cache_dir: str | Path | None = None) -> MovieLens100k:
    """Load MovieLens-100k from the recbole wheel (or a directory of ``ml-100k.*`` files).

    Token features are mapped to contiguous ids (0 = unknown) in order of first
    appearance in the sorted vocabulary, so ids do not depend on the split.

    Args:
        source (str or Path, optional): a ``.whl`` or a directory; None: fetch the wheel.
        cache_dir (str or Path, optional): download cache.

    Returns:
        MovieLens100k: 100,000 rows, 8 sparse features, 3 dense features.
    """
    src = Path(source) if source else fetch_recbole_wheel(cache_dir)
    inter = _read_atomic(src, "inter")
    users = {r[0]: r for r in _read_atomic(src, "user")}
    items = {r[0]: r for r in _read_atomic(src, "item")}

    def vocab(tokens: Sequence[str]) -> dict[str, int]:
        return {t: i + 1 for i, t in enumerate(sorted(set(tokens)))}

    user_tok = [r[0] for r in inter]
    item_tok = [r[1] for r in inter]
    rating = np.array([float(r[2]) for r in inter])
    ts = np.array([float(r[3]) for r in inter])
    u_rows = [users.get(u, ["", "", "", "", ""]) for u in user_tok]
    i_rows = [items.get(i, ["", "", "", ""]) for i in item_tok]
    age_tok = [u[1] for u in u_rows]
    columns = {
        "user_id": user_tok,
        "item_id": item_tok,
        "age": age_tok,
        "gender": [u[2] for u in u_rows],
        "occupation": [u[3] for u in u_rows],
        "zip_code": [u[4] for u in u_rows],
        "release_year": [i[2] for i in i_rows],
    }
    sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    num_embeddings: dict[str, int] = {}
    n = len(inter)
    for name, toks in columns.items():
        v = vocab(toks)
        sparse[name] = (np.array([v[t] for t in toks], np.int64), np.ones(n, np.int32))
        num_embeddings[name] = len(v) + 1
    genre_lists = [i[3].split() if len(i) > 3 else [] for i in i_rows]
    gv = vocab([g for gl in genre_lists for g in gl])
    sparse["genre"] = (
        np.array([gv[g] for gl in genre_lists for g in gl], np.int64),
        np.array([len(gl) for gl in genre_lists], np.int32),
    )
    num_embeddings["genre"] = len(gv) + 1

    def scaled(tokens: Sequence[str]) -> np.ndarray:
        x = np.array([float(t) if t.replace(".", "", 1).isdigit() else np.nan for t in tokens])
        lo, hi = np.nanmin(x), np.nanmax(x)
        return np.nan_to_num((x - lo) / max(hi - lo, 1e-9), nan=0.5)

    dense = np.stack([scaled(age_tok), scaled([i[2] for i in i_rows]), (ts - ts.min()) / max(np.ptp(ts), 1.0)], axis=1)
    labels = (rating >= 4).astype(np.float32)
    return MovieLens100k(dense.astype(np.float32), sparse, labels, num_embeddings)


# ----------------------------------------------------------------------------- Criteo files
def _criteo_npy_dataset(cfg: DataConfig, stage: str, batch_size: int, rank: int, world_size: int) -> IterableDataset:
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe

    days = range(cfg.criteo_days - 1) if stage == "train" else [cfg.criteo_days - 1]
    files = [[os.path.join(cfg.criteo_path, f"day_{d}_{kind}.npy") for d in days] for kind in ("dense", "sparse", "labels")]
    missing = [f for group in files for f in group if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(
            f"criteo_npy: {len(missing)} file(s) missing, e.g. {missing[0]} (expected day_{{0..{cfg.criteo_days - 1}}}_"
            "{dense,sparse,labels}.npy from torchrec/datasets/scripts/npy_preproc_criteo.py)"
        )
    return InMemoryBinaryCriteoIterDataPipe(
        stage,
        *files,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_batches=cfg.shuffle and stage == "train",
        hashes=cfg.num_embeddings_per_feature,
    )


class CriteoTsvDataset(IterableDataset):
    """Raw Criteo TSV rows (torchrec's ``criteo_kaggle``/``criteo_terabyte`` datapipe), batched per rank.

    Dense values become ``log(1 + max(x, 0))``; a categorical hex string ``h`` of feature
    ``f`` becomes ``int(h, 16) % num_embeddings[f]`` (empty: 0). Row ``i`` belongs to
    ``val`` when ``i % 1000 < 500 * eval_fraction``, to ``test`` when below
    ``1000 * eval_fraction``, else to ``train``. Rows are consumed in groups of
    ``batch_size * world_size``; an incomplete last group is dropped, so every rank
    yields the same number of batches.

    Args:
        paths (list[str]): TSV files.
        stage (str): ``train``, ``val`` or ``test``.
        num_embeddings_per_feature (list[int]): 26 table sizes.
        batch_size (int): rows per batch (per rank).
        rank (int): this rank.
        world_size (int): ranks.
        eval_fraction (float): held-out fraction.
        start_batch (int): batches to skip (resume).
        max_batches (int, optional): stop after this many batches.
    """

    def __init__(
        self,
        paths: Sequence[str],
        stage: str,
        num_embeddings_per_feature: Sequence[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        eval_fraction: float = 0.1,
        start_batch: int = 0,
        max_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.paths, self.stage = list(paths), stage
        self.sizes = np.asarray(num_embeddings_per_feature, dtype=np.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.eval_fraction, self.start_batch, self.max_batches = eval_fraction, start_batch, max_batches
        self.keys = cat_feature_names(len(self.sizes))

    def _keep(self, i: int) -> bool:
        b = i % 1000
        if b < 500 * self.eval_fraction:
            return self.stage == "val"
        if b < 1000 * self.eval_fraction:
            return self.stage == "test"
        return self.stage == "train"

    def _to_batch(self, rows: list[list[str]]) -> Batch:
        n, num_cat = len(rows), len(self.sizes)
        labels = np.array([int(r[0] or 0) for r in rows], np.float32)
        dense = np.array([[int(x) if x else 0 for x in r[1:14]] for r in rows], np.float64)
        dense = np.log1p(np.maximum(dense, 0)).astype(np.float32)
        cats = np.array([[int(x, 16) if x else 0 for x in r[14 : 14 + num_cat]] for r in rows], np.int64)
        cats %= self.sizes
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.from_numpy(np.ascontiguousarray(cats.T).reshape(-1)),
            lengths=torch.ones(n * num_cat, dtype=torch.int32),
        )
        return Batch(torch.from_numpy(dense), kjt, torch.from_numpy(labels))

    def __iter__(self) -> Iterator[Batch]:
        from torchrec.datasets.criteo import CriteoIterDataPipe

        group = self.batch_size * self.world_size
        buffer: list[list[str]] = []
        produced = 0
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        rows = CriteoIterDataPipe(self.paths, row_mapper=None)
        for i, row in enumerate(rows):
            if not self._keep(i):
                continue
            buffer.append(row)
            if len(buffer) < group:
                continue
            if produced >= self.start_batch:
                yield self._to_batch(buffer[lo:hi])
            produced += 1
            buffer = []
            if self.max_batches is not None and produced >= self.max_batches:
                return


def _criteo_tsv_paths(cfg: DataConfig) -> list[str]:
    if cfg.criteo_tsv_files:
        names = cfg.criteo_tsv_files
    elif os.path.exists(os.path.join(cfg.criteo_path, "train.txt")):
        names = ["train.txt"]
    else:
        names = [f"day_{d}" for d in range(cfg.criteo_days)]
    paths = [os.path.join(cfg.criteo_path, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"criteo_tsv: missing {missing[:3]} (set --criteo_tsv_files)")
    return paths


# ----------------------------------------------------------------------------- factory
_MOVIELENS_CACHE: dict[tuple[str, str], MovieLens100k] = {}


def _movielens(cfg: DataConfig) -> MovieLens100k:
    key = (cfg.movielens_path, cfg.cache_dir)
    if key not in _MOVIELENS_CACHE:
        _MOVIELENS_CACHE[key] = load_movielens100k(cfg.movielens_path or None, cfg.cache_dir or None)
    return _MOVIELENS_CACHE[key]


def prepare_data(cfg: DataConfig) -> None:
    """One-off work before the ranks read data (run on one process per machine): downloads.

    Args:
        cfg (DataConfig): the data section.
    """
    if cfg.dataset == "movielens100k" and not cfg.movielens_path:
        fetch_recbole_wheel(cfg.cache_dir or None)


def table_sizes(cfg: DataConfig) -> tuple[list[str], list[int], int]:
    """``(feature names, rows per table, dense features)`` implied by the data section.

    Example::

        >>> names, sizes, num_dense = table_sizes(DataConfig(num_embeddings_per_feature=[10, 20], num_dense_features=2))
        >>> names, sizes, num_dense
        (['cat_0', 'cat_1'], [10, 20], 2)
    """
    if cfg.dataset == "movielens100k":
        ml = _movielens(cfg)
        return list(MOVIELENS_FEATURES), [ml.num_embeddings[k] for k in MOVIELENS_FEATURES], len(MOVIELENS_DENSE)
    sizes = list(cfg.num_embeddings_per_feature)
    return cat_feature_names(len(sizes)), sizes, cfg.num_dense_features


def make_dataset(
    cfg: DataConfig,
    stage: str,
    rank: int,
    world_size: int,
    start_batch: int = 0,
    epochs: int | None = 1,
) -> IterableDataset:
    """The per-rank dataset of one split.

    Args:
        cfg (DataConfig): the data section.
        stage (str): ``train``, ``val`` or ``test``.
        rank (int): this rank.
        world_size (int): ranks.
        start_batch (int): batches already consumed (training resume).
        epochs (int, optional): passes over finite training data (None: forever).

    Returns:
        IterableDataset: yields ``Batch``.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    batch_size = cfg.batch_size if stage == "train" else (cfg.eval_batch_size or cfg.batch_size)
    if cfg.dataset == "synthetic":
        return SyntheticCriteoDataset(
            cfg.num_embeddings_per_feature,
            batch_size,
            cfg.num_dense_features,
            stage=stage,
            rank=rank,
            world_size=world_size,
            multi_hot_sizes=cfg.multi_hot_sizes or None,
            zipf_alpha=cfg.zipf_alpha,
            signal_scale=cfg.signal_scale,
            seed=cfg.data_seed,
            eval_samples=cfg.eval_samples,
            start_batch=start_batch,
            pool_batches=cfg.synthetic_pool_batches,
        )
    if cfg.dataset == "movielens100k":
        ml = _movielens(cfg)
        dense, sparse, labels = ml.subset(ml.split(cfg.data_seed)[stage])
        return InMemoryRecDataset(
            dense,
            sparse,
            labels,
            batch_size,
            rank,
            world_size,
            shuffle=cfg.shuffle and stage == "train",
            seed=cfg.data_seed,
            epochs=epochs if stage == "train" else 1,
            start_batch=start_batch if stage == "train" else 0,
        )
    if cfg.dataset == "criteo_multihot":
        from torchrec_tt.training.criteo_multihot import CriteoMultiHotDataset  # it imports this module

        ds: IterableDataset = CriteoMultiHotDataset(
            cfg.criteo_path, cfg.criteo_days, stage, cfg.num_embeddings_per_feature, batch_size, rank, world_size,
            multi_hot_sizes=cfg.multi_hot_sizes,
        )
    elif cfg.dataset == "criteo_npy":
        ds = _criteo_npy_dataset(cfg, stage, batch_size, rank, world_size)
    else:
        paths = _criteo_tsv_paths(cfg)
        ds = CriteoTsvDataset(
            paths, stage, cfg.num_embeddings_per_feature, batch_size, rank, world_size, cfg.eval_fraction
        )
    if stage == "train" and (start_batch or epochs != 1):
        return _Repeat(ds, epochs, start_batch)
    return ds


class _Repeat(IterableDataset):
    """``epochs`` passes over a re-iterable dataset, skipping the first ``start_batch`` batches."""

    def __init__(self, ds: IterableDataset, epochs: int | None, start_batch: int) -> None:
        super().__init__()
        self.ds, self.epochs, self.start_batch = ds, epochs, start_batch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("infinite stream")
        return max(len(self.ds) * self.epochs - self.start_batch, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        passes = itertools.repeat(None) if self.epochs is None else itertools.repeat(None, self.epochs)
        stream = itertools.chain.from_iterable(iter(self.ds) for _ in passes)
        return itertools.islice(stream, self.start_batch, None)


def make_dataloader(
    cfg: DataConfig,
    stage: str,
    rank: int,
    world_size: int,
    start_batch: int = 0,
    epochs: int | None = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over :func:`make_dataset` (batches are made by the dataset).

    Args:
        cfg (DataConfig): the data section (``num_workers`` background processes).
        stage (str): ``train``, ``val`` or ``test``.
        rank (int): this rank.
        world_size (int): ranks.
        start_batch (int): batches already consumed (resume).
        epochs (int, optional): passes over finite training data.
        pin_memory (bool): pin host memory (CUDA).

    Returns:
        DataLoader: yields ``Batch``.
    """
    ds = make_dataset(cfg, stage, rank, world_size, start_batch, epochs)
    workers = cfg.num_workers if cfg.dataset in ("synthetic", "movielens100k") else min(cfg.num_workers, 1)
    return DataLoader(
        ds,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
