"""A peer process for the fault tests: connects a link, then keeps sending until killed.

usage: python tp_peer.py PORT
Prints "ready" once the link is up. Sends 4 MiB transfers (tag 1, seq 0, 1, ...)
forever; its own receives are never posted, and its side buffer is tiny, so a
big transfer sent to it stalls.
"""

from __future__ import annotations

import sys

from transport.link import connect_link
from transport.loop import new_event_loop


async def main(port: int) -> None:
    link = await connect_link("127.0.0.1", port, connections=4, peer_id="victim", side_buffer_limit=1 << 20)
    print("ready", flush=True)
    data = bytes(range(256)) * (4 << 12)
    seq = 0
    while True:
        await link.send(1, seq, data)
        seq += 1


if __name__ == "__main__":
    new_event_loop().run_until_complete(main(int(sys.argv[1])))
