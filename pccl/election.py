"""The master's shared-state election: a pure function of the peers' reports.

Every peer of a group that votes to sync its shared state sends a :class:`SyncReport`
(revision, strategy, per-key :class:`EntryMeta`). Once the vote is complete the master
calls :func:`elect` and acts on the returned :class:`Election`: kick the peers in
``kicks`` (the reason is shown to the kicked peer), send every other peer its
:class:`SyncPlan`. No I/O, no clock, no randomness, and the result does not depend on
the iteration order of the input mapping.

The rules, applied in this order (``docs/protocol.md`` "Shared state" follows them):

1. **Strategies** (PCCL's rules). ``enforce_popular`` may not be mixed with the other
   strategies: if any peer enforces popular content, every peer that declared
   ``receive_only`` or ``send_only`` is kicked. ``receive_only`` peers never vote,
   never decide the revision and never send a byte. ``send_only`` peers declare their
   content correct: one whose content is not the elected one (so it would have to
   receive) is kicked. A peer with an unknown strategy string is kicked.
2. **Revision.** *Voters* are the remaining ``enforce_popular`` / ``send_only`` peers.
   On the group's first sync (``last_revision is None``) the target revision is the
   highest revision any voter reports (a run may resume from a checkpoint). Afterwards
   it is ``last_revision + 1``. A peer reporting more than the target is kicked
   (revision violation). A peer reporting less is *outdated*: it fetches every entry
   whose content differs and adopts the target revision. If no voter holds the
   target revision there is nothing trustworthy to elect and every peer is kicked.
3. **Schema.** The key set and, per key, dtype, shape, byte size and the
   ``allow_content_inequality`` flag must be identical on every peer. The reference
   schema is the one most voters at the target revision hold (ties: the smallest in
   the canonical sorted order); a peer that differs is kicked with the first
   offending key named.
4. **Content.** Among the voters at the target revision, the *signature* of a peer is
   the tuple of its hashes in sorted key order, leaving out entries that allow content
   inequality. The signature held by most voters wins; ties go to the
   lexicographically smallest signature (bytes compare), never to arrival order.
   Electing whole signatures rather than key by key guarantees the elected state is
   one that a peer really holds (weights and optimizer moments that belong together).
   For an ``allow_content_inequality`` key the popular hash is the one most winning
   peers hold (ties: smallest hash).
5. **Plans.** A peer fetches the keys whose hash differs from the popular one. Entries
   that allow content inequality are fetched only by peers that have no valid content
   of their own: outdated peers and ``receive_only`` peers. Distributors of a key are
   the non-kicked, non-``receive_only`` peers at the target revision holding the
   popular hash, sorted by peer id and rotated by (key index + requester index) so the
   load spreads over distributors by key and by requester, deterministically.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping, TypeVar

if TYPE_CHECKING:
    from _typeshed import SupportsRichComparison

    T = TypeVar("T", bound=SupportsRichComparison)
else:
    T = TypeVar("T")

ENFORCE_POPULAR = "enforce_popular"
RECEIVE_ONLY = "receive_only"
SEND_ONLY = "send_only"
STRATEGIES = (ENFORCE_POPULAR, RECEIVE_ONLY, SEND_ONLY)

# Revision reported in an Election where nothing could be elected and no revision was known.
NO_REVISION = -1


@dataclass(frozen=True)
class EntryMeta:
    """What a peer tells the master about one shared-state entry.

    ``hash`` is the content hash of the entry's raw bytes (xxh3-128, 16 bytes);
    ``dtype`` is the torch dtype's name without the ``torch.`` prefix (``"float32"``).
    """

    hash: bytes
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    allow_content_inequality: bool

    def schema(self) -> tuple[str, tuple[int, ...], int, bool]:
        """Everything about the entry that must match across peers, content aside."""
        return (self.dtype, tuple(self.shape), self.nbytes, self.allow_content_inequality)


@dataclass(frozen=True)
class SyncReport:
    """One peer's vote to sync: its revision, strategy and entries."""

    revision: int
    strategy: str  # "enforce_popular" | "receive_only" | "send_only"
    entries: Mapping[str, EntryMeta]


@dataclass(frozen=True)
class SyncPlan:
    """What one peer must do: fetch ``fetch``'s keys, then hold revision ``revision``.

    ``fetch`` maps each dirty key to the distributor peer ids to ask, in preference
    order (the first is the assigned one, the rest are fall-backs).
    """

    revision: int
    fetch: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Election:
    """The outcome of one shared-state vote of one group.

    ``plans`` has an entry for every reporting peer that is not kicked (an empty
    ``fetch`` means: already up to date, just adopt ``revision``). ``kicks`` maps
    each kicked peer to the reason. ``popular`` maps every key to the elected hash.
    When no peer could be elected, ``plans`` and ``popular`` are empty and
    ``revision`` is ``last_revision`` (or ``NO_REVISION``): the master must not
    record it as the group's new revision.
    """

    revision: int
    plans: Mapping[int, SyncPlan]
    kicks: Mapping[int, str]
    popular: Mapping[str, bytes]


Schema = tuple[tuple[str, tuple[str, tuple[int, ...], int, bool]], ...]


def _schema_of(report: SyncReport) -> Schema:
    return tuple(sorted((key, meta.schema()) for key, meta in report.entries.items()))


def _most_popular(values: Iterable[T]) -> T:
    """The value held most often; ties go to the smallest value (stable, not arrival order)."""
    counts = Counter(values)
    best = max(counts.values())
    return min(v for v, n in counts.items() if n == best)


def _schema_difference(ref: Schema, got: Schema) -> str:
    """A reason naming the first key (in sorted order) where ``got`` differs from ``ref``."""
    ref_map, got_map = dict(ref), dict(got)
    for key in sorted(set(ref_map) | set(got_map)):
        if key not in got_map:
            return f"shared-state key set mismatch: key {key!r} is missing (the group has it)"
        if key not in ref_map:
            return f"shared-state key set mismatch: unexpected key {key!r} (the group does not have it)"
        (rd, rs, rn, ra), (gd, gs, gn, ga) = ref_map[key], got_map[key]
        if rd != gd:
            return f"shared-state entry {key!r}: dtype {gd} differs from the group's {rd}"
        if rs != gs:
            return f"shared-state entry {key!r}: shape {list(gs)} differs from the group's {list(rs)}"
        if rn != gn:
            return f"shared-state entry {key!r}: size {gn} bytes differs from the group's {rn}"
        if ra != ga:
            return (
                f"shared-state entry {key!r}: allow_content_inequality={ga} differs "
                f"from the group's {ra}"
            )
    raise AssertionError("schemas are equal")  # pragma: no cover - callers check first


def _strategy_kicks(reports: Mapping[int, SyncReport]) -> dict[int, str]:
    kicks: dict[int, str] = {}
    for peer, rep in reports.items():
        if rep.strategy not in STRATEGIES:
            kicks[peer] = f"unknown shared-state sync strategy {rep.strategy!r}"
    valid = {p: r for p, r in reports.items() if p not in kicks}
    if any(r.strategy == ENFORCE_POPULAR for r in valid.values()):
        for peer, rep in valid.items():
            if rep.strategy != ENFORCE_POPULAR:
                kicks[peer] = (
                    f"shared-state strategy conflict: this peer declared {rep.strategy} while "
                    f"other peers of the group declared {ENFORCE_POPULAR}; all must enforce popular"
                )
    return kicks


def _target_revision(voters: Mapping[int, SyncReport], last_revision: int | None) -> int | None:
    if last_revision is not None:
        return last_revision + 1
    return max((r.revision for r in voters.values()), default=None)


def _fail_all(
    reports: Mapping[int, SyncReport], kicks: dict[int, str], reason: str, last_revision: int | None
) -> Election:
    for peer in sorted(reports):
        kicks.setdefault(peer, reason)
    revision = NO_REVISION if last_revision is None else last_revision
    return Election(revision=revision, plans={}, kicks=dict(sorted(kicks.items())), popular={})


def elect(reports: Mapping[int, SyncReport], last_revision: int | None) -> Election:
    """Decide one group's shared-state sync from every member's report.

    ``last_revision`` is the revision the group agreed on at its previous sync, or
    ``None`` if the group never synced. See the module docstring for the rules.
    Pure and deterministic: the same reports in any order give an equal result.
    Raises nothing on any input of the declared types; an empty ``reports`` gives an
    empty election.
    """
    if not reports:
        return Election(NO_REVISION if last_revision is None else last_revision, {}, {}, {})
    kicks = _strategy_kicks(reports)
    alive = {p: r for p, r in reports.items() if p not in kicks}
    voters = {p: r for p, r in alive.items() if r.strategy != RECEIVE_ONLY}
    target = _target_revision(voters, last_revision)
    if target is None or not voters:
        return _fail_all(
            reports, kicks, "no peer offers shared-state content: every peer is receive_only", last_revision
        )
    for peer, rep in alive.items():
        if rep.revision > target:
            kicks[peer] = (
                f"shared-state revision violation: reported {rep.revision}, expected {target} "
                f"(each sync must be exactly +1 over the group's last, {last_revision})"
            )
    current = {p: r for p, r in voters.items() if p not in kicks and r.revision == target}
    if not current:
        return _fail_all(
            reports, kicks, f"no peer that may send holds the expected shared-state revision {target}",
            last_revision,
        )
    ref = _most_popular(_schema_of(r) for r in current.values())
    for peer, rep in alive.items():
        if peer not in kicks and _schema_of(rep) != ref:
            kicks[peer] = _schema_difference(ref, _schema_of(rep))
    current = {p: r for p, r in current.items() if p not in kicks}
    popular = _elect_content(current)
    for peer, rep in alive.items():
        if rep.strategy == SEND_ONLY and peer not in kicks:
            dirty = _dirty_keys(rep, popular, everything=rep.revision < target)
            if dirty:
                kicks[peer] = (
                    f"send_only peer does not hold the elected shared-state content "
                    f"(differs on {', '.join(repr(k) for k in dirty)}); it would have to receive"
                )
    remaining = {p: r for p, r in alive.items() if p not in kicks}
    holders = {p: r for p, r in remaining.items() if r.strategy != RECEIVE_ONLY and r.revision == target}
    plans = _plans(remaining, holders, popular, target)
    return Election(revision=target, plans=plans, kicks=dict(sorted(kicks.items())), popular=popular)


def _signature(report: SyncReport) -> tuple[bytes, ...]:
    return tuple(m.hash for _, m in sorted(report.entries.items()) if not m.allow_content_inequality)


def _elect_content(current: Mapping[int, SyncReport]) -> dict[str, bytes]:
    """The popular hash per key among ``current`` (non-empty, identical schemas)."""
    winning_sig = _most_popular(_signature(r) for r in current.values())
    winners = [r for r in current.values() if _signature(r) == winning_sig]
    keys = sorted(next(iter(current.values())).entries)
    popular: dict[str, bytes] = {}
    for key in keys:
        popular[key] = _most_popular(r.entries[key].hash for r in winners)
    return popular


def _dirty_keys(rep: SyncReport, popular: Mapping[str, bytes], *, everything: bool) -> list[str]:
    """Keys (sorted) whose hash differs from the popular one; inequality-tolerant ones only if ``everything``."""
    return [
        key
        for key in sorted(popular)
        if rep.entries[key].hash != popular[key]
        and (everything or not rep.entries[key].allow_content_inequality)
    ]


def _plans(
    remaining: Mapping[int, SyncReport],
    holders: Mapping[int, SyncReport],
    popular: Mapping[str, bytes],
    target: int,
) -> dict[int, SyncPlan]:
    keys = sorted(popular)
    distributors = {
        key: sorted(p for p, r in holders.items() if r.entries[key].hash == popular[key]) for key in keys
    }
    index = {key: i for i, key in enumerate(keys)}
    plans: dict[int, SyncPlan] = {}
    for rank, peer in enumerate(sorted(remaining)):
        rep = remaining[peer]
        everything = rep.revision < target or rep.strategy == RECEIVE_ONLY
        fetch: dict[str, tuple[int, ...]] = {}
        for key in _dirty_keys(rep, popular, everything=everything):
            # Never empty: some elected peer holds every popular hash, and it is not
            # ``peer`` since ``peer``'s hash differs.
            dist = distributors[key]
            shift = (index[key] + rank) % len(dist)
            fetch[key] = tuple(dist[shift:] + dist[:shift])
        plans[peer] = SyncPlan(revision=target, fetch=fetch)
    return plans
