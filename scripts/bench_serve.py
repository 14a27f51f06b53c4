"""Benchmark the endpoint against the bare model on one model and print the ratios of the serving goals.

    flock /tmp/dogbreed-bench.lock python scripts/bench_serve.py [--model RUN_DIR] [--threads N] [--device cuda]

Measures, in one run: the bare forward of every runtime the package can carry (eager, ``torch.export``, ONNX
Runtime, OpenVINO FP32 and INT8 when ``openvino`` is installed) at batch 1 and 16, as ratios to eager; HTTP
``/invocations`` p50/p99 at
concurrency 1 (a real photo, decoded and preprocessed by the server) with dynamic batching on and off;
throughput and p99 at concurrency 16 with batching on and off; ONNX Runtime against eager at batch 1 (bare,
and over HTTP). Goals on CPU: HTTP p50 <= 1.2x the bare forward; batching >= 2x the unbatched throughput at
concurrency 16 (>= 3x on a GPU); ONNX Runtime >= 1.5x eager at batch 1. Eager runs where the server would (the
GPU when there is one; ``--device`` sets ``DOGBREED_DEVICE`` for this process and the servers); ONNX Runtime
always runs on the CPU. Without ``--model`` it uses a randomly initialised ResNet-18 at 224 px with 133
classes: the shape and cost of the real dog-breed model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import torch

from dogbreed._io import available_cpus
from dogbreed.artifacts import write_model_dir
from dogbreed.models.backbone import create_backbone
from dogbreed.serve.calibration import CALIBRATION_SIZE
from dogbreed.serve.package import build_package, extract_package, find_model_dir
from dogbreed.serve.runtime import load_model
from dogbreed.transforms import Preprocessing, load_rgb

PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "Labrador_retriever_06457.jpg"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bare_forward_ms(model_dir: Path, runtime: str, threads: int, n: int, batch: int = 1) -> float:
    """Median latency per image of the model's forward alone on ``batch`` copies of the preprocessed photo."""
    model = load_model(model_dir, runtime=runtime, num_threads=threads)
    x = model.preprocess([load_rgb(PHOTO.read_bytes())] * batch)
    for _ in range(2):
        model.forward(x)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        model.forward(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / batch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m dogbreed.serve`` in its own process, on 127.0.0.1, stopped on exit."""

    def __init__(self, package: Path, *args: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "dogbreed.serve", str(package), "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", self.url.rsplit(":", 1)[1], "--log-level", "warning", *args]
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError("the endpoint did not start")
            time.sleep(0.2)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/ping").json()


def http_sequential(url: str, body: bytes, n: int) -> list[float]:
    """Latencies (ms) of ``n`` requests one after another (concurrency 1)."""
    headers = {"Content-Type": "image/jpeg"}
    with httpx.Client(timeout=120) as client:
        for _ in range(5):
            client.post(f"{url}/invocations", content=body, headers=headers).raise_for_status()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.post(f"{url}/invocations", content=body, headers=headers).raise_for_status()
            times.append(1e3 * (time.perf_counter() - start))
    return times


async def http_concurrent(url: str, body: bytes, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Throughput (images/s) and latencies (ms) of ``n`` requests, ``concurrency`` in flight at a time."""
    headers = {"Content-Type": "image/jpeg"}
    latencies: list[float] = []
    remaining = n
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await client.post(f"{url}/invocations", content=body, headers=headers)
                response.raise_for_status()
                latencies.append(1e3 * (time.perf_counter() - start))

        await asyncio.gather(*(client.post(f"{url}/invocations", content=body, headers=headers) for _ in range(8)))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return n / wall, latencies


def synthetic_model_dir(root: Path) -> Path:
    torch.manual_seed(0)
    net, _ = create_backbone("resnet18", num_classes=133)
    names = [f"breed_{i:03d}" for i in range(133)]
    return write_model_dir(root / "model", net, backbone="resnet18", class_names=names, preprocessing=Preprocessing())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, help="run dir or model dir (default: a random 224 px, 133-class ResNet-18)"
    )
    parser.add_argument("--threads", type=int, default=available_cpus(), help="torch / ONNX Runtime threads")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency-16 run")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--calibration",
        type=Path,
        help="INT8 calibration images (default: the run's data; the demo data without --model)",
    )
    parser.add_argument("--calibration-size", type=int, default=CALIBRATION_SIZE, help="INT8 calibration images")
    parser.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="eager's device (auto: the GPU if any)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu or auto")
    if args.device != "auto":
        os.environ["DOGBREED_DEVICE"] = args.device  # read by load_model here and in the server processes
    device = os.environ.get("DOGBREED_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    body = PHOTO.read_bytes()
    results: dict[str, Any] = {"threads": args.threads, "cpus": available_cpus(), "torch": torch.__version__}
    results["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else device
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = find_model_dir(args.model) if args.model else synthetic_model_dir(Path(tmp))
        runtimes = ["eager", "export", "onnx", *(["openvino", "openvino-int8"] if find_spec("openvino") else [])]
        calibration = args.calibration or (None if args.model else Path(str(files("dogbreed") / "demo_data")))
        package = build_package(
            model_dir, Path(tmp) / "model.tar.gz", exports=runtimes[1:], runtime="eager", calibration=calibration,
            calibration_size=args.calibration_size,
        )  # fmt: skip
        unpacked = extract_package(package, Path(tmp) / "unpacked")
        size = load_model(unpacked).preprocessing.image_size
        print(f"model: {args.model or 'random ResNet-18, 133 classes'}, {size} px; {args.threads} threads on "
              f"{available_cpus()} CPUs; eager on {results['device']}; photo {PHOTO.name}")  # fmt: skip

        for runtime in runtimes:
            results[f"bare_{runtime}_ms"] = bare_forward_ms(unpacked, runtime, args.threads, 30)
            results[f"bare_{runtime}_b16_ms_per_image"] = bare_forward_ms(unpacked, runtime, args.threads, 5, batch=16)
        common = ["--threads", str(args.threads), "--max-delay-ms", str(args.max_delay_ms)]
        batching = [*common, "--max-batch-size", str(args.max_batch_size)]
        with Server(package, *batching) as server:
            c1 = http_sequential(server.url, body, 50)
            results["http_c1_p50_ms"], results["http_c1_p99_ms"] = percentile(c1, 50), percentile(c1, 99)
            before = server.stats()
            rate, lat = asyncio.run(http_concurrent(server.url, body, args.requests, 16))
            after = server.stats()
            results["c16_batched_img_s"], results["c16_batched_p99_ms"] = rate, percentile(lat, 99)
            results["c16_mean_batch"] = (after["images"] - before["images"]) / max(
                1, after["batches"] - before["batches"]
            )
        with Server(package, *common, "--max-batch-size", "1") as server:
            c1 = http_sequential(server.url, body, 50)
            results["http_c1_unbatched_p50_ms"] = percentile(c1, 50)
            results["http_c1_unbatched_p99_ms"] = percentile(c1, 99)
            rate, lat = asyncio.run(http_concurrent(server.url, body, args.requests, 16))
            results["c16_unbatched_img_s"], results["c16_unbatched_p99_ms"] = rate, percentile(lat, 99)
        with Server(package, *batching, "--runtime", "onnx") as server:
            c1 = http_sequential(server.url, body, 50)
            results["http_c1_onnx_p50_ms"] = percentile(c1, 50)

    r = results
    r["ratio_http_p50_over_bare"] = r["http_c1_p50_ms"] / r["bare_eager_ms"]
    r["ratio_batched_over_unbatched"] = r["c16_batched_img_s"] / r["c16_unbatched_img_s"]
    for runtime in runtimes:
        r[f"ratio_eager_over_{runtime}"] = r["bare_eager_ms"] / r[f"bare_{runtime}_ms"]
    r["ratio_http_onnx_p50_over_bare_onnx"] = r["http_c1_onnx_p50_ms"] / r["bare_onnx_ms"]
    batch_note = f"mean batch {r['c16_mean_batch']:.1f} (max {args.max_batch_size}, {args.max_delay_ms:g} ms)"
    rows = [
        ("bare eager forward, batch 1", f"p50 {r['bare_eager_ms']:7.1f} ms"),
        ("bare ONNX Runtime forward, batch 1", f"p50 {r['bare_onnx_ms']:7.1f} ms"),
        ("bare eager forward, batch 16", f"p50 {r['bare_eager_b16_ms_per_image']:7.1f} ms per image"),
        ("HTTP, concurrency 1", f"p50 {r['http_c1_p50_ms']:7.1f} ms   p99 {r['http_c1_p99_ms']:7.1f} ms"),
        (
            "HTTP, concurrency 1, batching off",
            f"p50 {r['http_c1_unbatched_p50_ms']:7.1f} ms   p99 {r['http_c1_unbatched_p99_ms']:7.1f} ms",
        ),
        ("HTTP, concurrency 1, ONNX Runtime", f"p50 {r['http_c1_onnx_p50_ms']:7.1f} ms"),
        (
            "concurrency 16, batching off",
            f"{r['c16_unbatched_img_s']:7.1f} img/s   p99 {r['c16_unbatched_p99_ms']:7.1f} ms",
        ),
        ("concurrency 16, batching on", f"{r['c16_batched_img_s']:7.1f} img/s   p99 {r['c16_batched_p99_ms']:7.1f} ms"),
        ("", batch_note),
        ("ratio HTTP p50 / bare forward", f"{r['ratio_http_p50_over_bare']:5.2f}x   (goal <= 1.2)"),
        ("ratio batched / unbatched throughput", f"{r['ratio_batched_over_unbatched']:5.2f}x   (goal >= 2)"),
        ("ratio eager / ONNX Runtime latency", f"{r['ratio_eager_over_onnx']:5.2f}x   (goal >= 1.5)"),
        ("ratio HTTP p50 / bare, ONNX Runtime", f"{r['ratio_http_onnx_p50_over_bare_onnx']:5.2f}x"),
    ]
    for name, value in rows:
        print(f"{name:<38} {value}")
    print(f"\n{'runtime':<15} {'batch 1':>10} {'x eager':>8} {'batch 16':>14} {'x eager':>8}")
    for runtime in runtimes:
        one, sixteen = r[f"bare_{runtime}_ms"], r[f"bare_{runtime}_b16_ms_per_image"]
        ratio1, ratio16 = r[f"ratio_eager_over_{runtime}"], r["bare_eager_b16_ms_per_image"] / sixteen
        print(f"{runtime:<15} {one:7.1f} ms {ratio1:7.2f}x {sixteen:7.1f} ms/img {ratio16:6.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
