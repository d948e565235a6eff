"""What the master's status page shows: a JSON snapshot of the run and its terminal table.

:func:`snapshot` reads a :class:`~pccl.master_state.MasterState` (sans-IO: the clock is
passed in) and returns a JSON-able dict; :func:`format_status` turns such a dict back
into plain-text tables for ``pccl status``. The HTTP endpoint that serves both the JSON
and the self-refreshing HTML page is :mod:`pccl.status_http` (``docs/protocol.md`` §8).

Every list is sorted (peers and groups by id, kicks newest first), so two snapshots of
the same state are equal and a diff between two of them means something changed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from pccl.master_state import GroupState, MasterState, Removal

# Bumped when a field changes meaning or disappears (adding fields keeps it).
SNAPSHOT_VERSION = 1


def bandwidth_matrix(state: MasterState) -> dict[tuple[int, int], float]:
    """Measured directed bandwidths ``(sender, receiver) -> bytes/s`` known to the master.

    The single place the status page reads bandwidth from: the measurements of
    ``optimize_topology`` rounds (``docs/protocol.md`` §5.12); 0 marks a failed one.
    """
    return dict(state.bandwidth)


def snapshot(state: MasterState, now: float, *, master: str | None = None) -> dict[str, Any]:
    """A JSON-able picture of the run at master time ``now`` (the clock ``state`` was fed).

    ``master``: the master's ``host:port``, shown as is. Raises nothing for any
    state the master can reach.
    """
    global_size, num_groups, largest = state.stats()
    return {
        "version": SNAPSHOT_VERSION,
        "master": master,
        "heartbeat_timeout": state.heartbeat_timeout,
        "world": {"global_world_size": global_size, "num_peer_groups": num_groups, "largest_peer_group_size": largest},
        "peers": [_peer(state, pid, now) for pid in sorted(state.peers)],
        "groups": [_group(g) for _, g in sorted(state.groups.items())],
        "round": _round(state),
        "collectives": [c for _, g in sorted(state.groups.items()) for c in _collectives(g)],
        "bandwidth": _bandwidth(state),
        "recent_kicks": _removals(state.recent_kicks, now, with_error=True),
        "recent_departures": _removals(state.recent_departures, now, with_error=False),
    }


def _peer(state: MasterState, pid: int, now: float) -> dict[str, Any]:
    info = state.peers[pid]
    phase = "pending" if not info.accepted else ("joining" if info.joining else "accepted")
    return {
        "id": pid,
        "address": _address(info.host, info.port),
        "group": info.group,
        "state": phase,
        "heartbeat_age": round(max(0.0, now - info.last_seen), 3),
        "waiting_in": state.blocked_in(pid),
        "in_flight": sorted(info.in_flight),
    }


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _group(group: GroupState) -> dict[str, Any]:
    sync = group.sync
    sync_view: dict[str, Any] | None = None
    if sync is not None:
        if sync.fetching:
            waiting = sorted(sync.plans - set(sync.done))
        else:
            waiting = sorted(set(group.ring) - set(sync.reports))
        sync_view = {
            "sync_id": sync.sync_id,
            "phase": "fetching" if sync.fetching else "reporting",
            "revision": sync.revision if sync.fetching else None,
            "waiting_for": waiting,
        }
    return {
        "id": group.id,
        "ring": list(group.ring),
        "epoch": group.epoch,
        "links_ready": group.links_ready(),
        "revision": group.last_revision,
        "revision_holders": sorted(group.holders),
        "sync": sync_view,
    }


def _round(state: MasterState) -> dict[str, Any] | None:
    rnd = state.round
    if rnd is None:
        return None
    waiting = [] if rnd.linking else sorted(set(state.accepted()) - rnd.voters)
    return {
        "kind": rnd.kind,
        "phase": "linking" if rnd.linking else "voting",
        "voters": sorted(rnd.voters),
        "joiners": sorted(rnd.joiners),
        "waiting_for": waiting,
    }


def _collectives(group: GroupState) -> list[dict[str, Any]]:
    out = []
    for tag in sorted(group.collectives):
        coll = group.collectives[tag]
        descriptors = [coll.descriptors[p] for p in sorted(coll.descriptors)]
        kind = descriptors[0].get("kind") if descriptors else None
        if coll.op_id:
            waiting = sorted(set(coll.ring) - set(coll.reports))
        else:
            waiting = sorted(set(group.ring) - set(coll.descriptors))
        out.append({
            "group": group.id,
            "tag": tag,
            "kind": kind if isinstance(kind, str) else None,
            "op_id": coll.op_id or None,
            "state": "running" if coll.op_id else "initiating",
            "participants": sorted(coll.participants()),
            "waiting_for": waiting,
        })
    return out


def _bandwidth(state: MasterState) -> dict[str, Any]:
    """Rows are senders, columns receivers, over the live peers; ``None``: not measured, 0: failed."""
    peers = sorted(state.peers)
    measured = bandwidth_matrix(state)
    return {
        "peers": peers,
        "bytes_per_s": [[_finite(measured.get((a, b))) for b in peers] for a in peers],
    }


def _finite(value: float | None) -> float | None:
    # JSON has no inf/nan (the page's JSON.parse would reject the whole document).
    return value if value is None or math.isfinite(value) else None


def _removals(records: Iterable[Removal], now: float, *, with_error: bool) -> list[dict[str, Any]]:
    out = []
    for rec in reversed(list(records)):
        item: dict[str, Any] = {"peer": rec.peer, "group": rec.group, "age": round(max(0.0, now - rec.at), 3)}
        if with_error:
            item["error"] = rec.error
        item["reason"] = rec.reason
        out.append(item)
    return out


# --- terminal rendering --------------------------------------------------------------


def format_rate(value: float | None) -> str:
    """``1.25 GB/s``-style decimal units; ``-`` for an unmeasured pair, ``failed`` for 0."""
    if value is None:
        return "-"
    if value <= 0:
        return "failed"
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} B/s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart; ``(none)`` under the headers when empty."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _ids(ids: Iterable[int]) -> str:
    return " ".join(str(i) for i in ids) or "-"


def format_status(snap: Mapping[str, Any]) -> str:
    """The snapshot as the plain-text tables ``pccl status`` prints.

    Raises:
        KeyError, TypeError: ``snap`` is not a snapshot of this version.
    """
    world = snap["world"]
    peers = snap["peers"]
    pending = sum(1 for p in peers if p["state"] == "pending")
    sections = [
        f"master {snap.get('master') or '?'}: {world['global_world_size']} accepted peers in "
        f"{world['num_peer_groups']} groups, {pending} pending, heartbeat timeout {snap['heartbeat_timeout']:g} s",
        "PEERS\n" + table(
            ["id", "address", "group", "state", "heartbeat", "waiting in", "in flight"],
            [[p["id"], p["address"], p["group"], p["state"], f"{p['heartbeat_age']:.1f} s ago",
              p["waiting_in"] or "-", _ids(p["in_flight"])] for p in peers],
        ),
        "GROUPS\n" + table(
            ["group", "ring", "epoch", "links", "revision", "holders", "sync"],
            [[g["id"], " -> ".join(str(p) for p in g["ring"]) or "-", g["epoch"],
              "ready" if g["links_ready"] else "linking",
              "-" if g["revision"] is None else g["revision"], _ids(g["revision_holders"]), _sync_text(g["sync"])]
             for g in snap["groups"]],
        ),
        "MEMBERSHIP ROUND\n" + _round_text(snap["round"]),
        "COLLECTIVES IN FLIGHT\n" + table(
            ["group", "tag", "kind", "op", "state", "participants", "waiting for"],
            [[c["group"], c["tag"], c["kind"] or "-", c["op_id"] or "-", c["state"],
              _ids(c["participants"]), _ids(c["waiting_for"])] for c in snap["collectives"]],
        ),
        "BANDWIDTH (bytes/s, row sends to column)\n" + _bandwidth_text(snap["bandwidth"]),
        "RECENT KICKS\n" + table(
            ["peer", "group", "when", "error", "reason"],
            [[k["peer"], k["group"], f"{k['age']:.1f} s ago", k["error"], k["reason"]] for k in snap["recent_kicks"]],
        ),
        "RECENT DEPARTURES\n" + table(
            ["peer", "group", "when", "reason"],
            [[d["peer"], d["group"], f"{d['age']:.1f} s ago", d["reason"]] for d in snap["recent_departures"]],
        ),
    ]
    return "\n\n".join(sections) + "\n"


def _sync_text(sync: Mapping[str, Any] | None) -> str:
    if sync is None:
        return "-"
    return f"#{sync['sync_id']} {sync['phase']}, waiting for {_ids(sync['waiting_for'])}"


def _round_text(rnd: Mapping[str, Any] | None) -> str:
    if rnd is None:
        return "(none)"
    return (
        f"{rnd['kind']} ({rnd['phase']}): voters {_ids(rnd['voters'])}, joiners {_ids(rnd['joiners'])}, "
        f"waiting for {_ids(rnd['waiting_for'])}"
    )


def _bandwidth_text(bw: Mapping[str, Any]) -> str:
    peers = bw["peers"]
    if not peers:
        return "(none)"
    rows = [[src] + ["." if src == dst else format_rate(v) for dst, v in zip(peers, row)]
            for src, row in zip(peers, bw["bytes_per_s"])]
    return table(["from\\to"] + [str(p) for p in peers], rows)
