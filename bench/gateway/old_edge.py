"""Albert edge: a tiny TCP forwarder in front of the api (rendered onto the host by fab deploy).

Each new connection goes to the port named in the upstream file at that moment, so a redeploy
switches by rewriting the file: connections in flight stay with the old api until they end.
Standard library only: it runs in the api image with ``python3``.
"""

import argparse
import asyncio
import contextlib
import os
import signal


async def pump(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def upstream(path, cache={}):  # noqa: B006 - a per-process cache keyed by mtime
    st = os.stat(path)
    if cache.get("mtime") != st.st_mtime_ns:
        with open(path) as handle:
            cache["port"] = int(handle.read().strip())
        cache["mtime"] = st.st_mtime_ns
    return cache["port"]


async def handle(client_reader, client_writer, path):
    for _attempt in range(50):  # the upstream restarts rarely; wait for it rather than drop
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream(path))
            break
        except (OSError, ValueError):
            await asyncio.sleep(0.1)
    else:
        client_writer.close()
        return
    await asyncio.gather(pump(client_reader, up_writer), pump(up_reader, client_writer))


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream-file", required=True)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.upstream_file), "0.0.0.0", args.listen, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
