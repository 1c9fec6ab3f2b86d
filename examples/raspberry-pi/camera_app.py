"""Run the device's edgekit model on camera frames.

The app embeds the agent (``from edgekit.agent import Agent``): predictions happen in this
process, with the model the fleet installed, and the agent records latency and drift for them.
Frames come from the first source that works:

1. ``picamera2`` (Raspberry Pi camera; `sudo apt install python3-picamera2`, and a venv made
   with ``--system-site-packages`` so it can see it),
2. OpenCV (``cv2.VideoCapture``: a USB camera, a V4L2 device, a video file or an RTSP URL),
3. a folder of images (PNG/JPEG read with OpenCV or Pillow, or ``.npy`` arrays), so the app
   runs anywhere, e.g. on a laptop before any camera is attached.

    python camera_app.py --config /etc/edgekit/agent.toml                  # best source found
    python camera_app.py --config agent.toml --source folder --folder frames --json
    python camera_app.py --config agent.toml --connect                     # also follow the fleet

Each frame is converted to the model's input: grayscale or RGB as its channel count says,
resized to its height and width, scaled to [0, 1] (the agent quantizes for int8 models). With
``--connect`` the app also runs the agent's MQTT side (what ``edgekit-agent run`` does): it
installs what the fleet's desired state names and reports telemetry; run it *instead of* the
edgekit-agent service then, one process per state directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
from edgekit.agent import Agent
from edgekit.errors import EdgekitError

log = logging.getLogger("camera_app")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".npy")


# -- frame sources: each yields (name, H x W x 3 uint8 RGB or H x W gray) ------------------------


def picamera2_frames() -> Iterator[tuple[str, np.ndarray]]:
    from picamera2 import Picamera2  # type: ignore[import-not-found]

    camera = Picamera2()
    camera.configure(camera.create_preview_configuration(main={"format": "RGB888", "size": (640, 480)}))
    camera.start()
    try:
        count = 0
        while True:
            count += 1
            yield f"picamera2:{count}", camera.capture_array()
    finally:
        camera.stop()


def opencv_frames(device: str) -> Iterator[tuple[str, np.ndarray]]:
    import cv2  # type: ignore[import-not-found]

    capture = cv2.VideoCapture(int(device) if device.isdigit() else device)
    if not capture.isOpened():
        raise OSError(f"OpenCV cannot open camera {device!r}")
    try:
        count = 0
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            count += 1
            yield f"opencv:{count}", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def read_image(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    try:
        import cv2

        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"cannot read image {path}")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    except ImportError:
        pass
    try:
        from PIL import Image
    except ImportError:
        raise OSError(
            f"reading {path.suffix} files needs OpenCV or Pillow; .npy arrays need neither"
        ) from None
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def folder_frames(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OSError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    for path in files:
        yield path.name, read_image(path)


def open_source(kind: str, folder: Path, device: str) -> tuple[str, Iterator[tuple[str, np.ndarray]]]:
    """The first source of ``kind`` (or, for auto, of picamera2, OpenCV, folder) that opens."""
    candidates = ["picamera2", "opencv", "folder"] if kind == "auto" else [kind]
    for name in candidates:
        try:
            if name == "picamera2":
                frames = picamera2_frames()
            elif name == "opencv":
                frames = opencv_frames(device)
            else:
                frames = folder_frames(folder)
            first = next(frames)  # opening happens on the first frame
        except (ImportError, OSError, RuntimeError, StopIteration) as exc:
            log.info("frame source %s unavailable: %s", name, exc or "no frames")
            continue

        def chain(first: tuple[str, np.ndarray] = first, rest: Iterator[Any] = frames) -> Iterator[Any]:
            yield first
            yield from rest

        return name, chain()
    raise SystemExit(
        f"error: no frame source works ({', '.join(candidates)}); try --source folder --folder DIR"
    )


# -- preprocessing -----------------------------------------------------------------------------


def _resize_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = image.shape[axis]
    if size >= n:  # growing: nearest neighbour
        return np.take(image, (np.arange(size) * n // size), axis=axis)
    edges = np.linspace(0, n, size + 1).astype(int)  # shrinking: mean of each block
    sums = np.add.reduceat(image, edges[:-1], axis=axis)
    counts = np.diff(edges).reshape([-1 if a == axis else 1 for a in range(image.ndim)])
    return sums / counts


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-average when shrinking, nearest when growing; numpy only (OpenCV is optional)."""
    return _resize_axis(_resize_axis(image.astype(np.float32), height, 0), width, 1)


def to_input(frame: np.ndarray, shape: list[int]) -> np.ndarray:
    """One frame as the model's input (batch of 1), real values in [0, 1]."""
    height, width = shape[1], shape[2]
    channels = shape[3] if len(shape) > 3 else 1
    image = frame.astype(np.float32)
    if image.max(initial=0.0) > 1.0:
        image = image / 255.0
    if image.ndim == 2:
        image = image[..., None]
    if channels == 1 and image.shape[-1] != 1:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = image[..., None]
    elif channels == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = resize(image, height, width)
    return image.reshape(shape).astype(np.float32)


# -- the app -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    with Agent.from_config(args.config) as agent:
        status = agent.status()
        if not status.serving:
            print(
                f"error: {status.device} serves no model yet; push one to fleet {status.fleet} "
                "or run `edgekit-agent install FILE.ekb`",
                file=sys.stderr,
            )
            return 1
        daemon = None
        if args.connect:
            from edgekit.agent.daemon import AgentDaemon

            daemon = AgentDaemon(agent).start()
        shape = list(status.inputs[0]["shape"])
        source, frames = open_source(args.source, Path(args.folder), args.camera)
        log.info("%s serves %s@%s; frames from %s", status.device, status.name, status.version, source)
        count = 0
        try:
            for name, frame in frames:
                start = time.perf_counter()
                scores = agent.predict(to_input(frame, shape))[0].reshape(-1)
                ms = (time.perf_counter() - start) * 1000
                top = int(np.argmax(scores))
                result = {"frame": name, "class": top, "score": float(scores[top]), "ms": round(ms, 3)}
                print(
                    json.dumps(result)
                    if args.json
                    else f"{name}: class {top} ({scores[top]:.2f}) {ms:.1f} ms"
                )
                count += 1
                if args.frames and count >= args.frames:
                    break
                if args.interval:
                    time.sleep(args.interval)  # the frame rate the app wants, not a wait for an event
        except KeyboardInterrupt:
            pass
        finally:
            if daemon is not None:
                daemon.stop()
        drift = agent.drift()
        summary = {
            "frames": count,
            "source": source,
            "model": f"{status.name}@{status.version}",
            "drifted": drift.drifted if drift is not None else None,
        }
        print(json.dumps({"summary": summary}) if args.json else f"{count} frames from {source}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="agent config (e.g. /etc/edgekit/agent.toml)")
    parser.add_argument("--source", choices=["auto", "picamera2", "opencv", "folder"], default="auto")
    parser.add_argument("--folder", default="frames", help="images for the folder source (default ./frames)")
    parser.add_argument("--camera", default="0", help="OpenCV camera index, device, file or URL (default 0)")
    parser.add_argument("--frames", type=int, default=0, help="stop after N frames (default: all / forever)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between frames")
    parser.add_argument("--connect", action="store_true", help="also follow the fleet over MQTT")
    parser.add_argument("--json", action="store_true", help="one JSON line per frame")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except EdgekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
