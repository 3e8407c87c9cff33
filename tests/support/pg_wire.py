"""A loopback TCP proxy in front of PostgreSQL that counts round trips as the wire sees them:
every ReadyForQuery ('Z') the server sends ends one exchange the client waited for (a simple
query, an extended-protocol Sync, the startup), so their count is the round trips taken."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

from sqlalchemy.engine import make_url


class WireCounter:
    """Round trips (ReadyForQuery messages) through the proxy since the last :meth:`reset`;
    ``lose_next_reply``: the server's next answer to a statement it ran (one with its
    CommandComplete) is swallowed and its client's connection closed (what the server did stays
    done: a reply lost with the connection)."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.lose_next_reply = False

    def reset(self) -> None:
        self.round_trips = 0


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: WireCounter | None
) -> None:
    """Copy one direction; from the server, count its ReadyForQuery messages."""
    buffer = b""
    started = False
    try:
        while chunk := await reader.read(65536):
            if counter is None:
                writer.write(chunk)
                await writer.drain()
                continue
            buffer += chunk
            if not started:  # the one-byte answer to an SSL request ('N': no TLS)
                if buffer[:1] == b"N":
                    buffer = buffer[1:]
                started = bool(buffer)
            kinds = []
            while len(buffer) >= 5:
                (length,) = struct.unpack("!i", buffer[1:5])
                if len(buffer) < 1 + length:
                    break
                kinds.append(buffer[:1])
                buffer = buffer[1 + length :]
            if counter.lose_next_reply and b"C" in kinds:  # a statement's end: it was run
                counter.lose_next_reply = False
                break
            counter.round_trips += kinds.count(b"Z")
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def counting_proxy(url: str) -> AsyncIterator[tuple[str, WireCounter]]:
    """The URL of a proxy to the PostgreSQL server of ``url`` (TLS off, so the wire can be
    read), and its counter."""
    target = make_url(url)
    counter = WireCounter()
    tasks: set[asyncio.Task[None]] = set()

    async def accept(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(target.host, target.port or 5432)
        for task in (
            asyncio.create_task(_pipe(client_r, server_w, None)),
            asyncio.create_task(_pipe(server_r, client_w, counter)),
        ):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxied = target.set(host="127.0.0.1", port=port, query={**target.query, "ssl": "disable"})
    try:
        yield proxied.render_as_string(hide_password=False), counter
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
