"""Turning what a chaos run recorded into verdicts: pure functions over logs and samples.

:func:`analyze` takes every peer process's event log (``stress.chaos_peer``), the faults
the orchestrator injected, the times it kept processes stopped, resource samples from
``/proc`` and the master's log, and returns the report: counts, parity checks and a list
of violations. Nothing here does I/O except :func:`read_events` and
:func:`parse_master_log`, so the checks can be tested with hand-made records, including
records that must fail.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

#: Errors a peer may meet in a chaos run and recover from (``docs/protocol.md`` §5.6.1, §5.7).
RECOVERABLE = frozenset(
    {"PeerLostError", "TooFewPeersError", "TopologyUpdateError", "SharedStateError", "MasterConnectionError",
     "TimeoutError"}
)
#: Lines in a process's stderr that mean an exception escaped somewhere.
STDERR_ALARMS = ("Traceback (most recent call last)", "exception was never retrieved", "Exception in callback",
                 "unexpectedly")


@dataclass
class Process:
    """One peer process of the run, as the orchestrator saw it."""

    name: str
    slot: int
    started: float
    ended: float | None = None
    exit_code: int | None = None
    killed: bool = False  # by the orchestrator (a fault, or a peer that would not stop)
    stops: list[tuple[float, float]] = field(default_factory=list)  # SIGSTOP .. SIGCONT
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, fds, rss KiB)
    stderr: str = ""


@dataclass
class Limits:
    """Bounds a run must stay within."""

    stall: float = 30.0
    fd_growth: int = 48
    rss_growth_mib: float = 96.0
    warmup: float = 10.0  # resource samples of a process younger than this are ignored
    min_life: float = 30.0  # processes shorter-lived than this are not judged on growth


def read_events(path: Path) -> list[dict[str, Any]]:
    """Events of one JSONL log; a last line cut short by SIGKILL is dropped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


_MASTER_LINE = re.compile(r"pccl\.master: (\w+)(.*)$")
_FIELD = re.compile(r"\s*(\w+)=")


def parse_master_log(text: str) -> list[tuple[str, dict[str, Any]]]:
    """The master's structured lines (``event key=json ...``) as (event, fields)."""
    out = []
    decoder = json.JSONDecoder()
    for line in text.splitlines():
        m = _MASTER_LINE.search(line)
        if m is None:
            continue
        rest, fields, pos = m.group(2), {}, 0
        while True:
            f = _FIELD.match(rest, pos)
            if f is None:
                break
            try:
                value, pos = decoder.raw_decode(rest, f.end())
            except json.JSONDecodeError:
                break
            fields[f.group(1)] = value
        out.append((m.group(1), fields))
    return out


def violation(kind: str, detail: str, **fields: Any) -> dict[str, Any]:
    """One entry of a report's ``violations``: what kind of check failed, and how."""
    return {"kind": kind, "detail": detail, **fields}


def check_values(procs: Iterable[Process]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every checked result was right, and every peer of one step/tensor got the same bytes."""
    violations: list[dict[str, Any]] = []
    seen: dict[tuple[int, int], list[tuple[str, int, tuple[int, ...], str]]] = defaultdict(list)
    steps = tensors = 0
    worst_quant = 0.0
    for proc in procs:
        for ev in proc.events:
            if ev.get("ev") != "step":
                continue
            steps += 1
            for i, check in enumerate(ev["checks"]):
                tensors += 1
                if check.get("bound"):
                    worst_quant = max(worst_quant, check.get("max_error", 0.0) / check["bound"])
                if check["error"]:
                    violations.append(violation("value", check["error"], process=proc.name, step=ev["step"], tensor=i))
                seen[(ev["step"], i)].append((proc.name, ev["peer_id"], tuple(check["participants"]), check["digest"]))
    agreeing = 0
    for (step, i), reports in sorted(seen.items()):
        outcomes = {(parts, dig) for _, _, parts, dig in reports}
        if len(outcomes) > 1:
            violations.append(violation(
                "parity", f"step {step} tensor {i}: peers hold different results "
                          f"{sorted((name, pid, list(p), d[:8]) for name, pid, p, d in reports)}",
                step=step, tensor=i))
            continue
        (parts, _), = outcomes
        strangers = sorted({pid for _, pid, _, _ in reports} - set(parts))
        if strangers:
            violations.append(violation("parity", f"step {step} tensor {i}: peers {strangers} reported a "
                                                   f"result that does not include them", step=step, tensor=i))
        elif len(reports) > 1:
            agreeing += 1
    summary = {"steps_checked": steps, "tensors_checked": tensors, "reduce_parity_checks": agreeing,
               "worst_quantized_error_to_bound": round(worst_quant, 4)}
    return summary, violations


def check_syncs(procs: Iterable[Process]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every synced state is the revision's content, and all peers at a revision hold the same hash."""
    violations: list[dict[str, Any]] = []
    by_revision: dict[int, set[str]] = defaultdict(set)
    counts: Counter[int] = Counter()
    syncs = perturbed = fetched = 0
    for proc in procs:
        for ev in proc.events:
            if ev.get("ev") != "sync":
                continue
            syncs += 1
            perturbed += bool(ev.get("perturbed"))
            fetched += ev.get("rx", 0) > 0
            if ev.get("problem"):
                violations.append(violation("shared_state", ev["problem"], process=proc.name, revision=ev["revision"]))
            by_revision[ev["revision"]].add(ev["hash"])
            counts[ev["revision"]] += 1
    agreeing = 0
    for revision, hashes in sorted(by_revision.items()):
        if len(hashes) > 1:
            violations.append(violation("shared_state", f"revision {revision}: peers hold {len(hashes)} different "
                                                         "states", revision=revision))
        elif counts[revision] > 1:
            agreeing += 1
    summary = {"syncs": syncs, "sync_parity_checks": agreeing, "perturbed_and_repaired": perturbed,
               "syncs_that_fetched": fetched, "max_revision": max(by_revision, default=0)}
    return summary, violations


def _stopped_between(stops: list[tuple[float, float]], a: float, b: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for start, end in stops)


def check_stalls(
    procs: Iterable[Process], limits: Limits, run_end: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """No process went longer than the bound without logging progress (time it was stopped excluded)."""
    violations, worst, worst_name = [], 0.0, ""
    for proc in procs:
        # From the process's first event on: the interpreter starting up is not pccl's doing.
        logged = sorted(float(ev["t"]) for ev in proc.events)
        times = (logged or [proc.started]) + [max(proc.ended or run_end, *logged[-1:])]
        for a, b in zip(times, times[1:]):
            gap = b - a - _stopped_between(proc.stops, a, b)
            if gap > worst:
                worst, worst_name = gap, proc.name
            if gap > limits.stall:
                violations.append(violation("stall", f"{proc.name} made no progress for {gap:.1f} s "
                                                      f"(bound {limits.stall:g} s)", process=proc.name, at=a))
    return {"max_stall_s": round(worst, 2), "worst_process": worst_name, "bound_s": limits.stall}, violations


def check_errors(procs: Iterable[Process]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Only recoverable errors, nothing unexpected, no traceback in any stderr, no crash."""
    violations: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for proc in procs:
        for ev in proc.events:
            if ev.get("ev") == "error":
                counts[f"{ev['op']}:{ev['type']}"] += 1
                if ev["type"] not in RECOVERABLE:
                    violations.append(violation("error", f"{proc.name} {ev['op']}: {ev['type']}: {ev['message']}",
                                                 process=proc.name))
            elif ev.get("ev") == "unexpected":
                violations.append(violation("unexpected", f"{proc.name} {ev['op']}: {ev['type']}: {ev['message']}",
                                             process=proc.name, traceback=ev.get("traceback", "")))
        for alarm in STDERR_ALARMS:
            if alarm in proc.stderr:
                line = next(ln for ln in proc.stderr.splitlines() if alarm in ln)
                violations.append(violation("stderr", f"{proc.name}: {line.strip()[:300]}", process=proc.name))
                break
        if not proc.killed and proc.exit_code not in (0, None):
            violations.append(violation("crash", f"{proc.name} exited with code {proc.exit_code}", process=proc.name))
    return {"recoverable_errors": dict(sorted(counts.items()))}, violations


def growth(samples: list[tuple[float, int, int]], started: float, limits: Limits) -> tuple[int, float] | None:
    """(fd growth, RSS growth in MiB) from the first samples after warm-up to the last ones."""
    usable = [s for s in samples if s[0] - started >= limits.warmup]
    if len(usable) < 6 or usable[-1][0] - started < limits.min_life:
        return None
    k = max(3, len(usable) // 5)
    early, late = usable[:k], usable[-k:]
    fds = min(s[1] for s in late) - max(s[1] for s in early)
    rss = (min(s[2] for s in late) - max(s[2] for s in early)) / 1024
    return fds, rss


def check_resources(procs: Iterable[Process], limits: Limits) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """File descriptors and RSS of each long-lived process stayed within the growth bounds."""
    violations: list[dict[str, Any]] = []
    judged: dict[str, dict[str, float]] = {}
    for proc in procs:
        g = growth(proc.samples, proc.started, limits)
        if g is None:
            continue
        fds, rss = g
        judged[proc.name] = {"fd_growth": fds, "rss_growth_mib": round(rss, 1)}
        if fds > limits.fd_growth:
            violations.append(violation("fd_growth", f"{proc.name}: {fds} more file descriptors "
                                                      f"(bound {limits.fd_growth})", process=proc.name))
        if rss > limits.rss_growth_mib:
            violations.append(violation("rss_growth", f"{proc.name}: RSS grew {rss:.0f} MiB "
                                                       f"(bound {limits.rss_growth_mib:g})", process=proc.name))
    return {"judged": judged}, violations


def master_counts(lines: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Collectives started / completed / aborted, kicks by cause, votes and syncs, from the master's log."""
    c: Counter[str] = Counter()
    kicks: Counter[str] = Counter()
    for event, fields in lines:
        if event == "collective_done":
            c["collectives_completed" if fields.get("success") else "collectives_aborted"] += 1
        elif event == "collective_failed":
            c["collectives_failed_before_start"] += 1
        elif event == "kick":
            reason = str(fields.get("reason", ""))
            kicks["heartbeat timeout" if "silent for" in reason else reason.split(":")[0][:60]] += 1
        elif event in ("collective_start", "join", "accept", "leave", "lost", "link_failed", "ring",
                       "vote_resolved", "vote_failed", "sync_resolved", "sync_failed", "revision_forgotten"):
            c[event] += 1
    return {**dict(sorted(c.items())), "kicks": dict(sorted(kicks.items()))}


def analyze(procs: list[Process], faults: list[dict[str, Any]], master_log: str, master: Process,
            limits: Limits, run_end: float, extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole report: sections of counts plus every violation found (``ok`` if none)."""
    violations: list[dict[str, Any]] = list(extra or [])
    sections: dict[str, Any] = {}
    for name, (summary, found) in {
        "values": check_values(procs),
        "shared_state": check_syncs(procs),
        "stall": check_stalls(procs, limits, run_end),
        "errors": check_errors([*procs, master]),
        "resources": check_resources([*procs, master], limits),
    }.items():
        sections[name] = summary
        violations += found
    injected = Counter(f["kind"] for f in faults if f.get("done"))
    skipped = Counter(f["kind"] for f in faults if not f.get("done"))
    sections["faults"] = {"injected": dict(sorted(injected.items())), "skipped": dict(sorted(skipped.items())),
                          "total_injected": sum(injected.values())}
    sections["master"] = master_counts(parse_master_log(master_log))
    return {"ok": not violations, "violations": violations, **sections}


def summary_text(report: dict[str, Any]) -> str:
    """A few human-readable lines about a report."""
    v, s, st, m = report["values"], report["shared_state"], report["stall"], report["master"]
    f = report["faults"]
    lines = [
        f"chaos run: {'OK' if report['ok'] else 'FAILED'} ({len(report['violations'])} violation(s))",
        f"faults injected: {f['total_injected']} {f['injected']}; skipped {f['skipped']}",
        f"collectives: {m.get('collectives_completed', 0)} completed, {m.get('collectives_aborted', 0)} aborted "
        f"and retried, {m.get('collectives_failed_before_start', 0)} failed before starting",
        f"values: {v['steps_checked']} steps / {v['tensors_checked']} results checked against the reference, "
        f"{v['reduce_parity_checks']} cross-peer parity checks passed",
        f"shared state: {s['syncs']} syncs checked, {s['sync_parity_checks']} revision parity checks passed, "
        f"{s['perturbed_and_repaired']} perturbed copies repaired, revision {s['max_revision']} reached",
        f"max stall: {st['max_stall_s']} s ({st['worst_process']}, bound {st['bound_s']} s)",
        f"kicks: {m.get('kicks', {})}",
        f"recoverable errors: {report['errors']['recoverable_errors']}",
    ]
    for viol in report["violations"][:20]:
        lines.append(f"VIOLATION [{viol['kind']}] {viol['detail']}")
    if len(report["violations"]) > 20:
        lines.append(f"... and {len(report['violations']) - 20} more (see the JSON report)")
    return "\n".join(lines)
