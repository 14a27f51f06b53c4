"""Benchmark every runtime a package can carry, bare and behind the endpoint, on one model, in one run.

    flock /tmp/dogbreed-bench.lock python scripts/bench_serve.py [--model RUN_DIR] [--threads 1 2] [--device cuda]

For each thread count (default: 1 and all cores) and each runtime (eager, ``torch.export``, ONNX Runtime, and
OpenVINO FP32 and INT8 when ``openvino`` is installed), one table row: the bare forward at batch 1 and 16; HTTP
``/invocations`` p50/p99 at concurrency 1 (a real photo, decoded and preprocessed by the server) and images/s and
p99 at concurrency 16 (dynamic batching on); the server's peak RSS; each as a ratio to eager's. Then eager's
server with batching off, for the batching goal. Goals on CPU: HTTP p50 <= 1.2x the bare forward of the runtime
it serves; batching >= 2x the unbatched throughput at concurrency 16 (>= 3x on a GPU); at batch 1 on one thread,
``torch.export`` >= 1x eager, OpenVINO FP32 >= 1.5x and INT8 >= 2.5x with VNNI or AMX (>= 1.6x on AVX2 alone).
Eager runs where the server would (the GPU when there is one; ``--device`` sets ``DOGBREED_DEVICE`` for this
process and the servers); ONNX Runtime and OpenVINO always run on the CPU. Without ``--model`` it uses a randomly
initialised ResNet-18 at 224 px with 133 classes (the shape and cost of the real dog-breed model), its INT8
calibrated on the demo data.
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

from dogbreed._io import available_cpus, cpu_description
from dogbreed.artifacts import write_model_dir
from dogbreed.models.backbone import create_backbone
from dogbreed.serve.calibration import CALIBRATION_SIZE
from dogbreed.serve.package import build_package, extract_package, find_model_dir
from dogbreed.serve.runtime import RUNTIMES, load_model
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


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (``VmHWM``; Linux only, else None)."""
    status = Path(f"/proc/{pid}/status")
    if not status.is_file():
        return None
    line = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1024 if line else None


def serving(package: Path, runtime: str, threads: int, args: argparse.Namespace, max_batch_size: int) -> Server:
    """The endpoint serving ``runtime`` of ``package`` with the run's threads and batching delay."""
    return Server(
        package, "--runtime", runtime, "--threads", str(threads), "--max-delay-ms", str(args.max_delay_ms),
        "--max-batch-size", str(max_batch_size),
    )  # fmt: skip


def measure(unpacked: Path, package: Path, runtime: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """One row of the table: the bare forward, then the endpoint serving this runtime with batching on."""
    torch.set_num_threads(threads)
    row: dict[str, Any] = {
        "fwd_b1_ms": bare_forward_ms(unpacked, runtime, threads, args.iterations),
        "fwd_b16_ms_per_image": bare_forward_ms(unpacked, runtime, threads, max(2, args.iterations // 6), batch=16),
    }
    body = PHOTO.read_bytes()
    with serving(package, runtime, threads, args, args.max_batch_size) as server:
        c1 = http_sequential(server.url, body, args.c1_requests)
        before = server.stats()
        rate, latencies = asyncio.run(http_concurrent(server.url, body, args.requests, 16))
        after = server.stats()
        row["peak_rss_mb"] = peak_rss_mb(server.process.pid)
    row.update(http_c1_p50_ms=percentile(c1, 50), http_c1_p99_ms=percentile(c1, 99), c16_img_s=rate,
               c16_p99_ms=percentile(latencies, 99))  # fmt: skip
    row["c16_mean_batch"] = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
    row["http_over_fwd"] = row["http_c1_p50_ms"] / row["fwd_b1_ms"]
    return row


def unbatched(package: Path, threads: int, args: argparse.Namespace) -> dict[str, float]:
    """Eager's endpoint with batching off: the baseline of the batching goal."""
    body = PHOTO.read_bytes()
    with serving(package, "eager", threads, args, max_batch_size=1) as server:
        c1 = http_sequential(server.url, body, args.c1_requests)
        rate, latencies = asyncio.run(http_concurrent(server.url, body, args.requests, 16))
    return {"http_c1_p50_ms": percentile(c1, 50), "c16_img_s": rate, "c16_p99_ms": percentile(latencies, 99)}


def print_table(threads: int, rows: dict[str, dict[str, Any]], off: dict[str, float], args: argparse.Namespace) -> None:
    eager = rows["eager"]
    print(f"\n{threads} thread{'s' * (threads > 1)}: bare forward (ms per image), /invocations (ms), server peak RSS")
    print("| runtime | batch 1 | x eager | batch 16 | x eager | HTTP c1 p50 | p99 | HTTP / bare | c16 img/s | p99 "
          "| x eager | peak RSS |\n|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for runtime, r in rows.items():
        rss = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] is not None else "n/a"
        print(
            f"| `{runtime}` | {r['fwd_b1_ms']:.1f} | {eager['fwd_b1_ms'] / r['fwd_b1_ms']:.2f}x "
            f"| {r['fwd_b16_ms_per_image']:.1f} | {eager['fwd_b16_ms_per_image'] / r['fwd_b16_ms_per_image']:.2f}x "
            f"| {r['http_c1_p50_ms']:.1f} | {r['http_c1_p99_ms']:.1f} | {r['http_over_fwd']:.2f}x "
            f"| {r['c16_img_s']:.1f} | {r['c16_p99_ms']:.0f} | {r['c16_img_s'] / eager['c16_img_s']:.2f}x | {rss} |"
        )
    batching = eager["c16_img_s"] / off["c16_img_s"]
    print(f"\neager, batching off: HTTP c1 p50 {off['http_c1_p50_ms']:.1f} ms; concurrency 16 {off['c16_img_s']:.1f} "
          f"img/s, p99 {off['c16_p99_ms']:.0f} ms; batching on / off throughput {batching:.2f}x (goal >= 2); mean "
          f"batch {eager['c16_mean_batch']:.1f} (max {args.max_batch_size}, {args.max_delay_ms:g} ms)")  # fmt: skip
    for runtime, r in rows.items():
        verdict = "meets" if r["http_over_fwd"] <= 1.2 else "misses"
        print(f"  {runtime}: HTTP p50 / bare forward {r['http_over_fwd']:.2f}x, {verdict} the goal <= 1.2x")


def print_goals(one_thread: dict[str, dict[str, Any]], cpu: str) -> None:
    """The speed goals at batch 1 on one thread; INT8's depends on the CPU's VNNI or AMX."""
    vnni = any(name in cpu for name in ("VNNI", "AMX"))
    goals = {"export": 1.0, "openvino": 1.5, "openvino-int8": 2.5 if vnni else 1.6}
    print(f"\nGoals at batch 1, one thread ({'VNNI or AMX' if vnni else 'no VNNI or AMX'} here):")
    for runtime, goal in goals.items():
        if runtime in one_thread:
            ratio = one_thread["eager"]["fwd_b1_ms"] / one_thread[runtime]["fwd_b1_ms"]
            print(f"  {runtime}: {ratio:.2f}x eager, {'meets' if ratio >= goal else 'misses'} the goal >= {goal}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, help="run dir or model dir (default: a random 224 px, 133-class ResNet-18)"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=sorted({1, available_cpus()}), help="torch / runtime threads: a "
        "table for each (default: 1 and all cores)"
    )  # fmt: skip
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, help="default: every one this Python can run")
    parser.add_argument("--iterations", type=int, default=30, help="bare forwards at batch 1 (batch 16: a sixth)")
    parser.add_argument("--c1-requests", type=int, default=50, help="requests at concurrency 1")
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
    runtimes = args.runtimes or [
        "eager",
        "export",
        "onnx",
        *(["openvino", "openvino-int8"] * bool(find_spec("openvino"))),
    ]
    runtimes = ["eager", *(r for r in runtimes if r != "eager")]  # every ratio is to eager's, measured in this run
    cpu = cpu_description()
    results: dict[str, Any] = {"cpu": cpu, "torch": torch.__version__, "tables": {}}
    results["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else device
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model_dir = find_model_dir(args.model) if args.model else synthetic_model_dir(Path(tmp))
        calibration = args.calibration or (None if args.model else Path(str(files("dogbreed") / "demo_data")))
        package = build_package(
            model_dir, Path(tmp) / "model.tar.gz", exports=runtimes[1:], runtime="eager", calibration=calibration,
            calibration_size=args.calibration_size,
        )  # fmt: skip
        unpacked = extract_package(package, Path(tmp) / "unpacked")
        size = load_model(unpacked).preprocessing.image_size
        print(f"model: {args.model or 'random ResNet-18, 133 classes'}, {size} px; eager on {results['device']}; "
              f"photo {PHOTO.name}\nCPU: {cpu}; torch {torch.__version__}")  # fmt: skip
        for threads in args.threads:
            rows = {runtime: measure(unpacked, package, runtime, threads, args) for runtime in runtimes}
            off = unbatched(package, threads, args)
            results["tables"][threads] = {"runtimes": rows, "eager_batching_off": off}
            print_table(threads, rows, off, args)
    if 1 in results["tables"]:
        print_goals(results["tables"][1]["runtimes"], cpu)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
