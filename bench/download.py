"""Model download speed: ``download_models`` vs a plain ``hf_hub_download`` loop, and the no-op re-run.

    .venv/bin/python bench/download.py [--mb 300] [--files 10] [--throttle-mbps 0]

Serves a generated multi-file model (safetensors shards + config/tokenizer files) from the local
hub server of the tests (tests/support/hubserver.py, 127.0.0.1) and fetches it with:
  - sequential: ``hf_hub_download`` file after file into a local dir (what a simple script does),
  - snapshot:   one plain ``snapshot_download(local_dir=...)`` (library defaults, 8 workers),
  - albert:     ``download_models`` (snapshot_download + verification + manifest + atomic install),
then times ``download_models`` again with everything installed (no network) and the same via the
CLI in a fresh process. Runs unthrottled and at 40 MB/s per connection (like a remote hub).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyalbert.config import load_spec  # noqa: E402
from pyalbert.hub import download_models  # noqa: E402
from pyalbert.hub.selection import select_files  # noqa: E402
from tests.support.hubserver import HubServer, safetensors_bytes, tiny_llama_files  # noqa: E402


def model_files(total_mb: int, n_files: int) -> dict[str, bytes]:
    files = tiny_llama_files(with_skipped=True, layers=2)
    del files["model.safetensors"]
    shards = max(1, n_files - len([f for f in files if not f.endswith((".pth", ".bin", ".msgpack", ".h5",
                                                                         ".onnx", ".gguf", ".gitattributes"))]))
    per_shard = total_mb * 1_000_000 // shards // 4
    for i in range(shards):
        files[f"model-{i + 1:05d}-of-{shards:05d}.safetensors"] = safetensors_bytes({"w": (per_shard,)}, seed=i)
    return files


def serve(conn, total_mb: int, n_files: int, throttle_bps: int | None) -> None:
    """The hub in its own process: client and server must not share a GIL."""
    with HubServer() as hub:
        hub.add_commit("bench/model", model_files(total_mb, n_files))
        hub.throttle_bps = throttle_bps
        conn.send(hub.url)
        while True:
            msg = conn.recv()
            if msg == "stop":
                return
            conn.send(len(hub.requests))  # "count"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="total size of the weights (MB)")
    parser.add_argument("--files", type=int, default=10, help="files vLLM needs (shards + config)")
    parser.add_argument("--throttle-mbps", type=float, default=-1,
                        help="per-connection cap (MB/s), 0 = none; default: both 0 and 40")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="albert-bench-download-"))
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(work / "hf-home"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1")
    os.environ.pop("HF_TOKEN", None)
    os.environ.pop("HF_HUB_OFFLINE", None)
    from huggingface_hub import hf_hub_download, snapshot_download

    from pyalbert.config.routing import ModelSpec

    files = model_files(args.mb, args.files)
    kept, skipped = select_files(ModelSpec(model="bench/model", port=8001), files)
    total = sum(len(files[f]) for f in kept)
    del files
    config = work / "config"
    (config / "environments").mkdir(parents=True)
    (config / "environments" / "bench.toml").write_text(
        f'storage_dir = "{work / "models"}"\n[[hosts]]\nname = "h"\naddress = "10.0.0.1"\n')
    (config / "llm_routing_table.json").write_text('{"bench": {"model": "bench/model", "port": 8001}}')
    spec = load_spec("bench", config)
    throttles = [args.throttle_mbps] if args.throttle_mbps >= 0 else [0, 40]
    try:
        for mbps in throttles:
            parent, child = multiprocessing.Pipe()
            server = multiprocessing.Process(target=serve, args=(child, args.mb, args.files,
                                                                  int(mbps * 1_000_000) or None))
            server.start()
            try:
                url = parent.recv()
                os.environ["HF_ENDPOINT"] = url
                print(f"\nmodel: {len(kept)} files vLLM needs, {total / 1e6:.0f} MB ({len(skipped)} other "
                      f"files skipped); hub {url} in its own process, "
                      + (f"{mbps:g} MB/s per connection" if mbps else "no throttle"))
                rows = []
                seq_dir = work / "sequential"
                rows.append(("sequential hf_hub_download", timed(lambda d=seq_dir, u=url: [
                    hf_hub_download("bench/model", f, local_dir=d, endpoint=u) for f in kept])))
                shutil.rmtree(seq_dir)
                snap_dir = work / "snapshot"
                rows.append(("snapshot_download (8 workers)", timed(lambda d=snap_dir, u=url: snapshot_download(
                    "bench/model", local_dir=d, allow_patterns=kept, endpoint=u))))
                shutil.rmtree(snap_dir)
                for workers in (1, 4, 8):
                    shutil.rmtree(work / "models", ignore_errors=True)
                    results = []
                    seconds = timed(lambda w=workers, r=results: r.extend(download_models(spec, files_per_model=w)))
                    assert results[0].status == "downloaded", results
                    rows.append((f"albert download_models ({workers} file(s) at once)", seconds))

                print(f"{'variant':<42} {'seconds':>8} {'MB/s':>8} {'vs sequential':>14}")
                base = rows[0][1]
                for name, seconds in rows:
                    print(f"{name:<42} {seconds:8.2f} {total / 1e6 / seconds:8.0f} {base / seconds:13.2f}x")

                parent.send("count")
                before = parent.recv()
                noop = min(timed(lambda: download_models(spec)) for _ in range(5))
                cli = timed(lambda: subprocess.run(
                    [str(REPO / ".venv/bin/albert"), "download-models", "--env", "bench", "--config-dir",
                     str(config)], check=True, capture_output=True))
                bare = timed(lambda: subprocess.run([str(REPO / ".venv/bin/albert"), "--version"],
                                                    check=True, capture_output=True))
                parent.send("count")
                requests = parent.recv() - before
                print(f"no-op re-run (installed, same revision): download_models {noop * 1000:.1f} ms "
                      f"({rows[-1][1] / noop:.0f}x faster than the download); CLI in a new process "
                      f"{cli * 1000:.0f} ms (albert --version alone: {bare * 1000:.0f} ms); hub requests: "
                      f"{requests}")
            finally:
                parent.send("stop")
                server.join(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
