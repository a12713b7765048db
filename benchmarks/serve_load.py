"""Load test for ``dgemma serve``: N concurrent streaming clients per concurrency level, one JSON report.

Responsible for: starting a server (a checkpoint with ``--model``, or a random-weight preset with
``--preset``, built in a child process of this script) or using a running one (``--url``); driving it
with ``--concurrency`` levels of asyncio + httpx clients that each send ``--requests-per-client``
streaming chat requests one after another; reporting per level the requests/s, output tokens/s, p50/p99
latency and time to the first canvas (the first chunk carrying text), 429s and other errors, and the
server's resident memory (and GPU memory through nvidia-smi where present) before and after.

    python benchmarks/serve_load.py --preset tiny --concurrency 2 --requests-per-client 1 --out load.json
    python benchmarks/serve_load.py --model path/to/ckpt --concurrency 1 8 32 64 --out load.json
    python benchmarks/serve_load.py --preset 26b-a4b --device cuda --dtype bfloat16 --max-num-seqs 64 \
        --concurrency 1 8 32 64 --max-tokens 256 --out load-26b.json        # one H100/H200
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --pid 1234 --out load.json

Requests ask for ``ignore_eos`` by default, so every request writes ``--max-tokens`` tokens and the
levels compare like with like; a 429 is counted and not retried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


# ------------------------------------------------------------------ server process and its memory
def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of ``pid`` (psutil when installed, else /proc/PID/status), or None."""
    if pid is None:
        return None
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:  # the process is gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_bytes(pid: int | None) -> int | None:
    """GPU memory nvidia-smi reports for ``pid``, or None (no nvidia-smi, or nothing for that process)."""
    if pid is None or shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [int(mib) * 2**20 for p, mib in (line.split(",")[:2] for line in out.splitlines() if "," in line)
            if p.strip() == str(pid) and mib.strip().isdigit()]
    return sum(used) if used else None


def memory(pid: int | None) -> dict:
    return {"rss_bytes": rss_bytes(pid), "gpu_bytes": gpu_bytes(pid)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port: int) -> list[str]:
    common = ["--port", str(port), "--max-num-seqs", str(args.max_num_seqs)]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--kv-cache-gb", args.kv_cache_gb),
                        ("--max-queue", args.max_queue)):
        if value is not None:
            common += [flag, str(value)]
    if args.model:
        return [sys.executable, "-m", "dgemma", "serve", "--model", args.model, "--log-level", "warning",
                *common, *args.serve_arg]
    return [sys.executable, str(Path(__file__).resolve()), "--serve-preset", args.preset, *common]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(server_command(args, port), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; its log: {log_path}\n"
                             + log_path.read_text()[-3000:])
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s; its log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_preset(args) -> int:
    """Child mode: a random-weight model from a preset behind the server app, on uvicorn."""
    import uvicorn

    from dgemma.bench.presets import preset_config
    from dgemma.engine import Engine
    from dgemma.loading import build_model
    from dgemma.server.app import create_app
    from dgemma.tokenizer import byte_tokenizer

    import torch

    cfg = preset_config(args.serve_preset)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = build_model(cfg, device=device, dtype=dtype, seed=0, embed_std=1.0)
    engine = Engine(model, tokenizer=byte_tokenizer(cfg.vocab_size))
    app = create_app(engine, model_id=f"preset-{args.serve_preset}", max_num_seqs=args.max_num_seqs,
                     kv_cache_gb=args.kv_cache_gb, max_queue=args.max_queue)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# ------------------------------------------------------------------ clients
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def request_body(args, client: int, k: int) -> dict:
    body = {"messages": [{"role": "user", "content": (args.prompt + " ") * args.prompt_repeat}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
            "ignore_eos": args.ignore_eos, "seed": 1000 * client + k}
    for name in ("max_denoising_steps", "confidence_threshold"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


async def one_request(http, url: str, body: dict, headers: dict) -> dict:
    """Stream one chat completion; what happened and when (seconds from its start)."""
    t0 = time.perf_counter()
    out = {"status": None, "latency": None, "first_canvas": None, "tokens": None, "chunks": 0, "error": None}
    try:
        async with http.stream("POST", url, json=body, headers=headers) as r:
            out["status"] = r.status_code
            if r.status_code != 200:
                out["error"] = (await r.aread()).decode(errors="replace")[:300]
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                out["chunks"] += 1
                if chunk.get("error"):
                    out["error"] = json.dumps(chunk["error"])[:300]
                    break
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"].get("completion_tokens")
                if out["first_canvas"] is None and any(
                        (c.get("delta") or {}).get("content") or (c.get("delta") or {}).get("reasoning_content")
                        for c in chunk.get("choices") or []):
                    out["first_canvas"] = time.perf_counter() - t0
    except Exception as e:  # a dropped connection, a timeout, a bad chunk: an error of this request
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    out["latency"] = time.perf_counter() - t0
    return out


async def run_level(base: str, args, concurrency: int) -> dict:
    import httpx

    url = base + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def client(i: int) -> list[dict]:
            return [await one_request(http, url, request_body(args, i, k), headers)
                    for k in range(args.requests_per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    for r in results:
        r["ok"] = r["status"] == 200 and r["error"] is None
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] or 0 for r in ok)
    lat = [r["latency"] for r in ok]
    ttfc = [r["first_canvas"] for r in ok if r["first_canvas"] is not None]
    errors = [r for r in results if r["status"] != 429 and not r["ok"]]
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok),
        "rejected_429": sum(r["status"] == 429 for r in results), "errors": len(errors),
        "error_samples": sorted({f"{r['status']}: {r['error']}" for r in errors})[:5],
        "wall_s": wall, "requests_per_s": len(ok) / wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
        "tokens_per_request_mean": tokens / len(ok) if ok else None,
        "latency_s": {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": max(lat, default=None)},
        "first_canvas_s": {"p50": percentile(ttfc, 50), "p99": percentile(ttfc, 99)},
    }


def line(level: dict) -> str:
    f = lambda v, n=3: "-" if v is None else f"{v:.{n}f}"  # noqa: E731
    return (f"c={level['concurrency']:>3}  ok {level['ok']:>4}/{level['requests']:<4} 429 {level['rejected_429']:>3} "
            f"err {level['errors']:>3}  {f(level['requests_per_s'], 2):>7} req/s  {f(level['tokens_per_s'], 1):>8} tok/s  "
            f"latency p50 {f(level['latency_s']['p50'])} p99 {f(level['latency_s']['p99'])} s  "
            f"first canvas p50 {f(level['first_canvas_s']['p50'])} p99 {f(level['first_canvas_s']['p99'])} s")


def run(args) -> dict:
    proc, pid = None, args.pid
    log_path = Path(args.out).with_suffix(".server.log")
    if args.url:
        base = args.url.rstrip("/")
    else:
        proc, base = start_server(args, log_path)
        pid = proc.pid
    report = {"server": base, "source": args.url or args.model or f"preset:{args.preset}", "pid": pid,
              "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "serve_preset", "port")},
              "memory_start": memory(pid), "levels": []}
    try:
        if args.warmup:
            warm = asyncio.run(run_level(base, argparse.Namespace(**{**vars(args), "requests_per_client": 1}),
                                         args.warmup))
            report["warmup"] = {"ok": warm["ok"], "errors": warm["error_samples"], "wall_s": warm["wall_s"]}
        for c in args.concurrency:
            before = memory(pid)
            level = asyncio.run(run_level(base, args, c))
            level["memory_before"], level["memory_after"] = before, memory(pid)
            report["levels"].append(level)
            print(line(level), flush=True)
        report["memory_end"] = memory(pid)
    finally:
        if proc is not None:
            stop_server(proc)
            report["server_log"] = str(log_path)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}", flush=True)
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="start `dgemma serve --model MODEL` (a checkpoint directory or Hub id)")
    src.add_argument("--preset", default="tiny", help="start a server on a random-weight preset (default tiny; "
                     "small, 26b-a4b)")
    src.add_argument("--serve-preset", help=argparse.SUPPRESS)  # the child process of --preset
    p.add_argument("--port", type=int, default=8000, help=argparse.SUPPRESS)
    p.add_argument("--pid", type=int, help="the --url server's process id, for its memory")
    p.add_argument("--api-key", default=os.environ.get("DGEMMA_API_KEY"))
    p.add_argument("--device"), p.add_argument("--dtype")
    p.add_argument("--max-num-seqs", type=int, default=64, help="server slots (default 64)")
    p.add_argument("--kv-cache-gb", type=float)
    p.add_argument("--max-queue", type=int, help="server queue before 429 (default: the server's)")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `dgemma serve` argument (with --model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1, help="requests sent (at once) before the levels, not counted")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-denoising-steps", type=int)
    p.add_argument("--confidence-threshold", type=float)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--prompt-repeat", type=int, default=1, help="repeat the prompt N times (longer prompts)")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for /health")
    p.add_argument("--out", default="serve_load.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_preset:
        return serve_preset(args)
    if any(c < 1 for c in args.concurrency) or args.requests_per_client < 1:
        raise SystemExit("--concurrency and --requests-per-client must be positive")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
