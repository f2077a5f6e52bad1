"""Retention: which snapshots the keep rules keep, and when a schedule is due (pure, no I/O).

Design notes:
1. Input is a list of :class:`Candidate` (id, created, status, verdict, in_use) the caller
   builds from the catalog; output one :class:`Decision` per candidate with a stable ``reason``
   code -- nothing here deletes anything.
2. Rules follow Proxmox's prune (``keep-last``, ``-hourly``, ``-daily``, ``-weekly`` (ISO
   week), ``-monthly``, ``-yearly``), applied in that order, newest first: each keeps the
   newest snapshot of each of the last N slots that hold one; a slot already holding a
   snapshot kept by an earlier rule is skipped and not counted (PBS ``mark_selections``: "the
   next option ... will only consider older backups"); a slot's older snapshots are pruned.
3. No rule set at all keeps everything (as Proxmox). Slots are computed in ``tz`` (UTC unless
   given: the server's zone is the caller's choice).
4. Only ``done`` snapshots are counted. ``running`` ones are never pruned. ``failed`` attempts
   older than the newest done snapshot are pruned; newer ones are kept (Proxmox keeps the
   last failed backup newer than the last good one) -- ``prune_failed=False`` keeps them all.
5. ``in_use`` (a disk writes to it, or the top of a chain depends on it) is never pruned
   (reason ``in-use``, detail says what the rules said); it is counted by the rules as usual.
6. Failed verification (:data:`FAILED_VERDICTS`: corrupt, check-failed, changed-since-cut;
   needs-recovery is the expected state of a crash-consistent cut, not a failure) does not
   make a snapshot a slot's keeper: the rules keep the newest *good* snapshot of each slot and
   count only slots with one. The issue's rule, "never [prune] a snapshot that failed
   verification if it is the only one in its slot", holds as written for the calendar rules
   (hourly ... yearly): a slot of an active calendar rule that holds no snapshot other than
   failed ones keeps its newest failed one, reason ``failed-verification-only-in-slot``, at
   ANY age -- also older than everything the rules keep (it stays until deleted by hand: a
   failed verification is for an operator to look at, never silently removed when it is the
   slot's only record). Several failed snapshots in one slot keep the newest (the others are
   not "the only one"). ``keep-last`` has no calendar slot (each snapshot is its own): a
   failed snapshot newer than the oldest one keep-last keeps is kept the same way, an older
   one is not (else keep-last alone would keep every failed snapshot forever).
7. :class:`Schedule` parses ``every`` (``30s``, ``15m``, ``1h``, ``1d``, ``1w``, ``1h30m``);
   :func:`due` anchors the next run at the last run + every; a server down for many slots runs
   ONCE at start (``missed`` says how many slots it skipped), never once per missed slot.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from freezeframe.errors import UsageError
from freezeframe.models import SnapshotStatus, VerifyVerdict

__all__ = [
    "FAILED_VERDICTS",
    "RULE_ORDER",
    "Candidate",
    "Decision",
    "Due",
    "KeepRules",
    "Reason",
    "Schedule",
    "due",
    "next_runs",
    "parse_every",
    "plan_prune",
    "slot_key",
]

#: Verdicts that count as a failed verification (see note 6).
FAILED_VERDICTS: frozenset[VerifyVerdict] = frozenset(
    {VerifyVerdict.CORRUPT, VerifyVerdict.CHECK_FAILED, VerifyVerdict.CHANGED}
)

#: The keep rules in the order they are applied.
RULE_ORDER: tuple[str, ...] = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


class Reason(enum.StrEnum):
    """Why a snapshot is kept or pruned (stable codes for ``--json`` and tests)."""

    # kept
    KEEP_LAST = "keep-last"
    KEEP_HOURLY = "keep-hourly"
    KEEP_DAILY = "keep-daily"
    KEEP_WEEKLY = "keep-weekly"
    KEEP_MONTHLY = "keep-monthly"
    KEEP_YEARLY = "keep-yearly"
    KEEP_ALL = "no-rules"  # no rule set: everything is kept
    IN_USE = "in-use"  # a disk writes to it / the chain's top depends on it
    RUNNING = "running"  # an attempt in progress (or not settled yet)
    FAILED_NEWEST = "failed-attempt-newest"  # failed, newer than the newest done snapshot
    FAILED_ONLY_IN_SLOT = "failed-verification-only-in-slot"
    # pruned
    SUPERSEDED = "superseded-in-slot"  # a newer snapshot of the same slot is kept
    NOT_SELECTED = "not-selected"  # outside every rule's reach
    FAILED_ATTEMPT = "failed-attempt"  # a failed attempt older than the newest done snapshot
    FAILED_VERIFICATION = "failed-verification"  # not counted by the rules, not protected


_RULE_REASON = {
    "last": Reason.KEEP_LAST,
    "hourly": Reason.KEEP_HOURLY,
    "daily": Reason.KEEP_DAILY,
    "weekly": Reason.KEEP_WEEKLY,
    "monthly": Reason.KEEP_MONTHLY,
    "yearly": Reason.KEEP_YEARLY,
}


@dataclass(frozen=True, slots=True)
class KeepRules:
    """How many slots each rule keeps (None or 0: the rule is off)."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None

    def __post_init__(self) -> None:
        for name in RULE_ORDER:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise UsageError(
                    f"keep-{name} must be a whole number >= 0, got {value!r}",
                    code="invalid-keep-rule",
                )

    def active(self) -> list[tuple[str, int]]:
        """``(rule, N)`` of every rule that is on, in :data:`RULE_ORDER`."""
        return [(name, n) for name in RULE_ORDER if (n := getattr(self, name))]

    def as_dict(self) -> dict[str, int]:
        """``{"keep-last": 3, ...}`` of the rules that are on."""
        return {f"keep-{name}": n for name, n in self.active()}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One snapshot as retention sees it. ``created``: when it was taken (aware datetime)."""

    id: str
    created: datetime
    status: SnapshotStatus
    verdict: VerifyVerdict | None = None
    in_use: bool = False

    @property
    def failed_verification(self) -> bool:
        return self.verdict in FAILED_VERDICTS


@dataclass(frozen=True, slots=True)
class Decision:
    """Keep or prune ``id``, and why; ``slot`` names the rule's slot when a rule decided
    (``2026-12-06T10`` hour, ``2026-12-06`` day, ``2026-W49`` week, ``2026-12`` month)."""

    id: str
    keep: bool
    reason: Reason
    slot: str | None = None
    detail: str = ""


def slot_key(rule: str, when: datetime, tz: tzinfo = UTC) -> str:
    """The slot of ``when`` under ``rule`` (``last``: the instant itself), in ``tz``.

    Raises UsageError for an unknown rule or a naive datetime."""
    if when.tzinfo is None:
        raise UsageError(f"a snapshot time without a time zone: {when}", code="naive-time")
    t = when.astimezone(tz)
    if rule == "last":
        return t.isoformat()
    if rule == "hourly":
        return t.strftime("%Y-%m-%dT%H")
    if rule == "daily":
        return t.strftime("%Y-%m-%d")
    if rule == "weekly":
        year, week, _ = t.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if rule == "monthly":
        return t.strftime("%Y-%m")
    if rule == "yearly":
        return t.strftime("%Y")
    raise UsageError(f"unknown keep rule {rule!r}", code="invalid-keep-rule")


def plan_prune(
    candidates: Sequence[Candidate],
    rules: KeepRules,
    *,
    tz: tzinfo = UTC,
    prune_failed: bool = True,
) -> list[Decision]:
    """Decide keep/prune for every candidate (same order as given), with a reason each.

    See the module notes for the semantics. Raises UsageError on a naive ``created`` or two
    candidates with the same id."""
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        raise UsageError("the same snapshot id is listed twice", code="invalid-argument")
    # newest first; ties broken by id so the result never depends on the input order
    ordered = sorted(candidates, key=lambda c: (c.created, c.id), reverse=True)
    for c in ordered:
        if c.created.tzinfo is None:
            raise UsageError(f"snapshot {c.id}: time without a time zone", code="naive-time")
    done = [c for c in ordered if c.status is SnapshotStatus.DONE]
    decided: dict[str, Decision] = {}

    active = rules.active()
    if not active:
        for c in done:
            decided[c.id] = Decision(c.id, True, Reason.KEEP_ALL)
    good = [c for c in done if not c.failed_verification]
    # rule name -> oldest instant its reach covers (None: it ran out of snapshots first)
    reach: dict[str, datetime | None] = {}
    for rule, n in active:
        reach[rule] = _apply_rule(rule, n, good, decided, tz)

    # failed verification: a slot with nothing but failed snapshots keeps its newest failed
    # one (at any age for a calendar rule; within its reach for keep-last: note 6)
    for rule, _ in active:
        limit = reach[rule]
        seen_slots: set[str] = set()
        good_slots = {slot_key(rule, c.created, tz) for c in good}
        for c in done:
            if not c.failed_verification:
                continue
            slot = slot_key(rule, c.created, tz)
            if slot in seen_slots:
                continue
            seen_slots.add(slot)
            if slot in good_slots or (c.id in decided and decided[c.id].keep):
                continue
            if rule == "last" and limit is not None and c.created < limit:
                continue  # keep-last has no calendar slot: older than anything it keeps
            decided[c.id] = Decision(
                c.id,
                True,
                Reason.FAILED_ONLY_IN_SLOT,
                slot,
                f"verification {c.verdict.value if c.verdict else '?'}, but no other snapshot "
                f"of {slot} ({rule} rule) is good",
            )

    newest_done = done[0].created if done else None
    out: list[Decision] = []
    for c in candidates:
        d = decided.get(c.id)
        if c.status is SnapshotStatus.RUNNING:
            d = Decision(c.id, True, Reason.RUNNING, detail="an attempt in progress")
        elif c.status is SnapshotStatus.FAILED:
            if newest_done is None or c.created > newest_done or not prune_failed:
                d = Decision(c.id, True, Reason.FAILED_NEWEST, detail="failed attempt kept")
            else:
                d = Decision(
                    c.id, False, Reason.FAILED_ATTEMPT, detail="older than a done snapshot"
                )
        elif c.status is not SnapshotStatus.DONE:  # pragma: no cover - a status added later
            d = Decision(c.id, True, Reason.RUNNING, detail=f"status {c.status}")
        elif d is None and c.failed_verification:
            d = Decision(
                c.id,
                False,
                Reason.FAILED_VERIFICATION,
                detail=f"verification {c.verdict.value if c.verdict else '?'}: not counted by "
                "the rules, and its slot has a good snapshot or is older than the rules keep",
            )
        elif d is None:
            d = Decision(c.id, False, Reason.NOT_SELECTED, detail="outside every keep rule")
        if c.in_use and not d.keep:
            d = Decision(
                c.id,
                True,
                Reason.IN_USE,
                d.slot,
                f"a disk writes to it or depends on it (rules said: {d.reason.value})",
            )
        out.append(d)
    return out


def _apply_rule(
    rule: str,
    n: int,
    good: Sequence[Candidate],
    decided: dict[str, Decision],
    tz: tzinfo,
) -> datetime | None:
    """One rule over ``good`` (newest first), recording into ``decided`` (PBS semantics).
    Returns the time of the oldest snapshot this rule kept when it filled its N slots, None
    when it ran out of snapshots first (its reach is then the whole history)."""
    reason = _RULE_REASON[rule]
    already = {
        slot_key(rule, c.created, tz)
        for c in good
        if c.id in decided and decided[c.id].keep and decided[c.id].reason in _KEPT_BY_RULE
    }
    included: dict[str, Candidate] = {}
    last_kept: datetime | None = None
    for c in good:
        if c.id in decided:
            continue
        slot = slot_key(rule, c.created, tz)
        if slot in already:
            continue
        if slot not in included:
            if len(included) >= n:
                return last_kept
            included[slot] = c
            last_kept = c.created
            decided[c.id] = Decision(c.id, True, reason, slot)
        else:
            keeper = included[slot]
            decided[c.id] = Decision(
                c.id, False, Reason.SUPERSEDED, slot, f"{keeper.id} is newer in {slot}"
            )
    return last_kept if len(included) >= n else None


_KEPT_BY_RULE = frozenset(_RULE_REASON.values())


# ---------------------------------------------------------------------------- schedules

_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EVERY_RE = re.compile(r"(\d+)([smhdw])")


def parse_every(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``1d``, ``2w``, ``1h30m`` -> timedelta.

    Raises UsageError (code ``invalid-interval``) for anything else or a zero interval."""
    s = text.strip().lower()
    pos = 0
    seconds = 0
    for m in _EVERY_RE.finditer(s):
        if m.start() != pos:
            break
        seconds += int(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise UsageError(
            f"not an interval: {text!r} (use e.g. 30s, 15m, 1h, 1d, 1h30m)",
            code="invalid-interval",
        )
    if seconds <= 0:
        raise UsageError(f"the interval must be longer than 0: {text!r}", code="invalid-interval")
    return timedelta(seconds=seconds)


def _format_every(every: timedelta) -> str:
    left = int(every.total_seconds())
    parts = []
    for unit, size in sorted(_UNIT.items(), key=lambda kv: -kv[1]):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A VM's schedule: a snapshot every ``every``, then prune by ``rules``."""

    vm: str
    every: timedelta
    rules: KeepRules = KeepRules()
    options: Mapping[str, str] | None = None  # e.g. {"quiesce": "required"}; the caller's

    def __post_init__(self) -> None:
        if self.every <= timedelta(0):
            raise UsageError("the interval must be longer than 0", code="invalid-interval")

    @classmethod
    def parse(cls, vm: str, every: str, rules: KeepRules = KeepRules()) -> Schedule:
        return cls(vm, parse_every(every), rules)

    @property
    def every_text(self) -> str:
        return _format_every(self.every)


@dataclass(frozen=True, slots=True)
class Due:
    """Whether a schedule should run at ``now``: ``run``; ``at`` when it is (or was) due;
    ``missed``: slots that passed without a run beyond the one run now (0 when on time)."""

    run: bool
    at: datetime
    missed: int = 0


def due(
    every: timedelta,
    last_run: datetime | None,
    now: datetime,
    *,
    clock_skew: timedelta | None = None,
) -> Due:
    """When the schedule of interval ``every``, last run at ``last_run`` (None: never), runs.

    Never run: due now. Else due at ``last_run + every``; when ``now`` is past it the run is
    due ONCE now however many slots were missed (the caller records the new ``last_run`` =
    when it ran, so the next one is ``every`` after that). A ``last_run`` in the future (the
    clock was set back) by more than ``clock_skew`` (default: ``every``) counts as due now,
    so a clock jump cannot silence a schedule. Raises UsageError on naive datetimes."""
    if now.tzinfo is None or (last_run is not None and last_run.tzinfo is None):
        raise UsageError("schedule times need a time zone", code="naive-time")
    if every <= timedelta(0):
        raise UsageError("the interval must be longer than 0", code="invalid-interval")
    if last_run is None:
        return Due(True, now)
    skew = every if clock_skew is None else clock_skew
    if last_run - now > skew:
        return Due(True, now)
    nxt = last_run + every
    if now < nxt:
        return Due(False, nxt)
    missed = int((now - nxt) / every)
    return Due(True, nxt, missed)


def next_runs(
    schedules: Sequence[Schedule],
    last_runs: Mapping[str, datetime | None],
    now: datetime,
) -> list[tuple[Schedule, Due]]:
    """Each schedule with its :class:`Due` at ``now``, soonest first (ties by VM name)."""
    pairs = [(s, due(s.every, last_runs.get(s.vm), now)) for s in schedules]
    return sorted(pairs, key=lambda p: (p[1].at, p[0].vm))
