"""The seeds' own Keras code (seed 001, BN after the activation), timed: ``make bench-peers`` runs it in its own venv.

Standalone on purpose (no bnsweep, no torch imports): it runs under a separate Python with TensorFlow.
The data are MNIST's idx files in torchvision's layout (<root>/MNIST/raw), split as the seed splits
them (the first 5,000 training images validate). Prints one line: ``keras_s_per_epoch=<s> val_acc=<acc>``.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np


def idx(path: Path) -> np.ndarray:
    if path.exists():
        raw = path.read_bytes()
    else:
        with gzip.open(f"{path}.gz") as f:
            raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="folder with MNIST/raw/*-ubyte")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=None)
    args = ap.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(0)
    raw = Path(args.root) / "MNIST" / "raw"
    x, y = idx(raw / "train-images-idx3-ubyte") / 255.0, idx(raw / "train-labels-idx1-ubyte")
    end = None if args.limit_train is None else 5000 + args.limit_train
    x_valid, x_train, y_valid, y_train = x[:5000], x[5000:end], y[:5000], y[5000:end]
    layers = [  # the seed's BN model: BN on the input and after each hidden activation
        tf.keras.layers.Flatten(input_shape=[28, 28]),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(300, kernel_initializer="he_normal"),
        tf.keras.layers.LeakyReLU(),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(100, kernel_initializer="he_normal"),
        tf.keras.layers.LeakyReLU(),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.Dense(10, activation="softmax"),
    ]
    model = tf.keras.models.Sequential(layers)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=tf.keras.optimizers.SGD(learning_rate=1e-3),
                  metrics=["accuracy"])
    times = []

    class Clock(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    history = model.fit(x_train, y_train, epochs=args.epochs, validation_data=(x_valid, y_valid), verbose=0,
                        callbacks=[Clock()])
    print(f"keras_s_per_epoch={float(np.median(times)):.4f} val_acc={history.history['val_accuracy'][-1]:.4f}")


if __name__ == "__main__":
    main()
