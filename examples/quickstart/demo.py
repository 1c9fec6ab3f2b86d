"""`make demo`: the edgekit story as far as it exists today, step by step.

1. a signing key, 2. a tiny CNN trained on scikit-learn's digits and converted to int8 TFLite,
3. a signed bundle with a drift baseline and a health check, 4. verification, 5. inspection,
6. the same check with OpenSSL alone, 7. a tampered copy refused.
Everything happens in ./demo-output with its own EDGEKIT_HOME; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np

OUT = Path("demo-output").resolve()
BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def edgekit(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    print("$ edgekit " + " ".join(args), flush=True)
    result = subprocess.run([str(BIN / "edgekit"), *args], text=True, check=False)
    if check and result.returncode != 0:
        sys.exit(f"demo failed at: edgekit {' '.join(args)}")
    return result


def train_model() -> tuple[Path, Path]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
    import keras
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), batch_size=1),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:1500], y[:1500], epochs=5, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(x[1500:], y[1500:], verbose=0)
    print(f"trained a digits CNN: {model.count_params()} parameters, test accuracy {accuracy:.3f}")

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([sample[None]] for sample in x[:200])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    model_path = OUT / "digits_int8.tflite"
    model_path.write_bytes(converter.convert())
    print(f"converted to int8 TFLite: {model_path.stat().st_size} bytes")
    data_path = OUT / "digits_baseline.npz"
    np.savez(data_path, x=x[1500:], y=y[1500:])
    return model_path, data_path


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    os.environ["EDGEKIT_HOME"] = str(OUT / "home")

    step("1. Create a signing key (EDGEKIT_HOME=demo-output/home)")
    edgekit("keys", "init")
    edgekit("keys", "export-public", "-o", str(OUT / "fleet-key.pem"))

    step("2. Train a tiny model on scikit-learn digits and convert it to int8 TFLite")
    model_path, data_path = train_model()
    labels = OUT / "labels.txt"
    labels.write_text("".join(f"{i}\n" for i in range(10)))

    step("3. Bundle and sign it, with a drift baseline and a health check")
    bundle = OUT / "digits-1.0.0.ekb"
    edgekit(
        "bundle",
        "create",
        str(model_path),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--labels",
        str(labels),
        "--baseline",
        str(data_path),
        "-o",
        str(bundle),
    )

    step("4. Verify it against the fleet's public key")
    edgekit("bundle", "verify", str(bundle), "--key", str(OUT / "fleet-key.pem"))

    step("5. Inspect it")
    edgekit("bundle", "inspect", str(bundle))

    step("6. Anyone can check the signature with OpenSSL alone")
    unpacked = OUT / "unpacked"
    with tarfile.open(bundle) as archive:
        archive.extractall(unpacked, filter="data")
    if shutil.which("openssl"):
        cmd = [
            "openssl",
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            str(OUT / "fleet-key.pem"),
            "-rawin",
            "-in",
            str(unpacked / "manifest.json"),
            "-sigfile",
            str(unpacked / "manifest.sig"),
        ]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    else:
        print("(openssl is not installed; skipping this step)")

    step("7. A tampered copy is refused, with one line and a non-zero exit")
    tampered = OUT / "tampered.ekb"
    data = bytearray(bundle.read_bytes())
    model = model_path.read_bytes()
    data[data.find(model) + len(model) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    result = edgekit("bundle", "verify", str(tampered), check=False)
    if result.returncode == 0:
        sys.exit("demo failed: the tampered bundle was accepted")
    print(f"(exit code {result.returncode}, as expected)")

    step(f"Done. Everything is in {OUT}")


if __name__ == "__main__":
    main()
