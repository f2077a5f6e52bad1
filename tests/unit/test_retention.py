"""Retention rules and schedules (freezeframe.engine.retention): tables worked out by hand
against Proxmox's documented prune semantics, and seeded random property checks (hypothesis
is not installed here)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from freezeframe.engine.retention import (
    RULE_ORDER,
    Candidate,
    Decision,
    KeepRules,
    Reason,
    Schedule,
    due,
    next_runs,
    parse_every,
    plan_prune,
    slot_key,
)
from freezeframe.errors import UsageError
from freezeframe.models import SnapshotStatus, VerifyVerdict

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)  # a Sunday
DONE = SnapshotStatus.DONE
BAD = VerifyVerdict.CORRUPT


def snap(
    sid: str,
    when: datetime,
    status: SnapshotStatus = DONE,
    verdict: VerifyVerdict | None = None,
    in_use: bool = False,
) -> Candidate:
    return Candidate(sid, when, status, verdict, in_use)


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.id: d for d in decisions}


def kept(decisions: list[Decision]) -> dict[str, str]:
    return {d.id: d.reason.value for d in decisions if d.keep}


def hourly_series(n: int, start: datetime = T0) -> list[Candidate]:
    """``n`` snapshots one hour apart ending at ``start``: h0 newest."""
    return [snap(f"h{i}", start - timedelta(hours=i)) for i in range(n)]


# ---------------------------------------------------------------------------- keep rules


def test_no_rules_keeps_everything() -> None:
    cands = hourly_series(5)
    out = plan_prune(cands, KeepRules())
    assert all(d.keep and d.reason is Reason.KEEP_ALL for d in out)
    assert [d.id for d in out] == [c.id for c in cands]  # input order kept


def test_keep_last() -> None:
    out = by_id(plan_prune(hourly_series(5), KeepRules(last=3)))
    assert kept(list(out.values())) == {"h0": "keep-last", "h1": "keep-last", "h2": "keep-last"}
    assert out["h3"].reason is out["h4"].reason is Reason.NOT_SELECTED
    assert not out["h3"].keep


def test_keep_hourly_newest_of_each_hour() -> None:
    t = T0  # 12:00
    cands = [
        snap("a", t),  # hour 12
        snap("b", t - timedelta(minutes=10)),  # 11:50
        snap("c", t - timedelta(minutes=50)),  # 11:10
        snap("d", t - timedelta(minutes=70)),  # 10:50
        snap("e", t - timedelta(minutes=130)),  # 9:50
    ]
    out = by_id(plan_prune(cands, KeepRules(hourly=2)))
    assert kept(list(out.values())) == {"a": "keep-hourly", "b": "keep-hourly"}
    assert out["a"].slot == "2026-12-06T12"
    assert out["b"].slot == "2026-12-06T11"
    assert out["c"].reason is Reason.SUPERSEDED
    assert "b" in out["c"].detail
    assert out["d"].reason is out["e"].reason is Reason.NOT_SELECTED


def test_later_rule_skips_slots_an_earlier_rule_covers() -> None:
    # 4 days of snapshots every 6 hours (T0 = 12:00): keep-last 2 keeps 12:00 and 06:00 of
    # day 0, so keep-daily 2 does not count day 0 and keeps the newest of days -1 and -2.
    cands = [snap(f"s{i}", T0 - timedelta(hours=6 * i)) for i in range(16)]
    out = by_id(plan_prune(cands, KeepRules(last=2, daily=2)))
    assert kept(list(out.values())) == {
        "s0": "keep-last",
        "s1": "keep-last",
        "s3": "keep-daily",  # 2026-12-05 18:00
        "s7": "keep-daily",  # 2026-12-04 18:00
    }
    # s2 (day 0, 00:00) is in a covered slot: not kept by the daily rule
    assert not out["s2"].keep


def test_rules_cascade_hourly_daily_weekly_monthly() -> None:
    # one snapshot a day for 70 days, ending on Sunday 2026-12-06
    cands = [snap(f"d{i}", T0 - timedelta(days=i)) for i in range(70)]
    out = plan_prune(cands, KeepRules(last=1, daily=3, weekly=2, monthly=2))
    k = kept(out)
    assert k == {
        "d0": "keep-last",  # Sun 12-06 (week 49, month 12)
        "d1": "keep-daily",  # 12-05
        "d2": "keep-daily",  # 12-04
        "d3": "keep-daily",  # 12-03
        # weekly: week 49 is covered by d0..d3; weeks 48 and 47: their Sundays
        "d7": "keep-weekly",  # Sun 11-29, week 48
        "d14": "keep-weekly",  # Sun 11-22, week 47
        # monthly: 12 covered, November covered (d7), so October and September
        "d36": "keep-monthly",  # 10-31
        "d67": "keep-monthly",  # 09-30
    }
    assert sum(d.keep for d in out) == 8


def test_iso_weeks_across_the_year_end() -> None:
    assert slot_key("weekly", datetime(2026, 12, 31, tzinfo=UTC)) == "2026-W53"
    assert slot_key("weekly", datetime(2027, 1, 3, tzinfo=UTC)) == "2026-W53"
    assert slot_key("weekly", datetime(2027, 1, 4, tzinfo=UTC)) == "2027-W01"
    cands = [
        snap("thu", datetime(2026, 12, 31, 8, tzinfo=UTC)),
        snap("sun", datetime(2027, 1, 3, 8, tzinfo=UTC)),
        snap("mon", datetime(2027, 1, 4, 8, tzinfo=UTC)),
    ]
    out = by_id(plan_prune(cands, KeepRules(weekly=5)))
    assert kept(list(out.values())) == {"mon": "keep-weekly", "sun": "keep-weekly"}
    assert out["thu"].reason is Reason.SUPERSEDED


def test_slots_follow_the_given_time_zone() -> None:
    tz = timezone(timedelta(hours=-5))
    a = snap("a", datetime(2026, 12, 6, 3, tzinfo=UTC))  # 22:00 on the 5th at UTC-5
    b = snap("b", datetime(2026, 12, 5, 23, tzinfo=UTC))  # 18:00 on the 5th at UTC-5
    assert kept(plan_prune([a, b], KeepRules(daily=5))) == {"a": "keep-daily", "b": "keep-daily"}
    assert kept(plan_prune([a, b], KeepRules(daily=5), tz=tz)) == {"a": "keep-daily"}


def test_in_use_is_never_pruned() -> None:
    cands = hourly_series(4)
    cands[3] = snap("h3", cands[3].created, in_use=True)
    out = by_id(plan_prune(cands, KeepRules(last=1)))
    assert out["h3"].keep
    assert out["h3"].reason is Reason.IN_USE
    assert "not-selected" in out["h3"].detail
    assert not out["h2"].keep


def test_running_and_failed_attempts_are_not_counted() -> None:
    cands = [
        snap("run", T0, SnapshotStatus.RUNNING),
        snap("fail-new", T0 - timedelta(minutes=1), SnapshotStatus.FAILED),
        snap("h1", T0 - timedelta(hours=1)),
        snap("fail-old", T0 - timedelta(hours=1, minutes=30), SnapshotStatus.FAILED),
        snap("h2", T0 - timedelta(hours=2)),
        snap("h3", T0 - timedelta(hours=3)),
    ]
    out = by_id(plan_prune(cands, KeepRules(last=2)))
    assert out["run"].keep
    assert out["run"].reason is Reason.RUNNING
    assert out["fail-new"].keep
    assert out["fail-new"].reason is Reason.FAILED_NEWEST
    assert not out["fail-old"].keep
    assert out["fail-old"].reason is Reason.FAILED_ATTEMPT
    # the two newest *done* snapshots, not counting the attempts
    assert {i for i, d in out.items() if d.reason is Reason.KEEP_LAST} == {"h1", "h2"}
    assert not out["h3"].keep
    keep_all = by_id(plan_prune(cands, KeepRules(last=2), prune_failed=False))
    assert keep_all["fail-old"].keep


def test_failed_verification_does_not_hold_a_slot() -> None:
    # day 0 has a good and a newer corrupt snapshot: the good one is the day's keeper
    cands = [
        snap("bad", T0, verdict=BAD),
        snap("good", T0 - timedelta(hours=2), verdict=VerifyVerdict.CONSISTENT),
        snap("y", T0 - timedelta(days=1)),
    ]
    out = by_id(plan_prune(cands, KeepRules(daily=2)))
    assert kept(list(out.values())) == {"good": "keep-daily", "y": "keep-daily"}
    assert out["bad"].reason is Reason.FAILED_VERIFICATION


def test_failed_verification_alone_in_its_slot_is_never_pruned() -> None:
    days = ["good0", "bad1", "good2", "good3", "bad4"]
    cands = [
        snap(name, T0 - timedelta(days=i), verdict=BAD if name.startswith("bad") else None)
        for i, name in enumerate(days)
    ]
    # a second, older corrupt snapshot on day 1: only the newest one of the slot is kept
    cands.append(snap("bad1-older", T0 - timedelta(days=1, hours=3), verdict=BAD))
    out = by_id(plan_prune(cands, KeepRules(daily=2)))
    assert kept(list(out.values())) == {
        "good0": "keep-daily",
        "bad1": "failed-verification-only-in-slot",  # day 1 has nothing good
        "good2": "keep-daily",  # the second good day: failed days are not counted
        # the "never": alone in its day, so kept although older than the rules keep
        "bad4": "failed-verification-only-in-slot",
    }
    assert out["bad1"].slot == "2026-12-05"
    assert "corrupt" in out["bad1"].detail
    assert out["bad1-older"].reason is Reason.FAILED_VERIFICATION
    assert out["good3"].reason is Reason.NOT_SELECTED
    assert out["bad4"].slot == "2026-12-02"


def test_keep_last_has_no_calendar_slot_for_a_failed_verification() -> None:
    cands = [
        snap("g0", T0),
        snap("b1", T0 - timedelta(hours=1), verdict=BAD),
        snap("g2", T0 - timedelta(hours=2)),
        snap("b3", T0 - timedelta(hours=3), verdict=BAD),
    ]
    out = by_id(plan_prune(cands, KeepRules(last=2)))
    # b1 lies among the last two good ones: kept; b3 is older than all keep-last keeps
    assert kept(list(out.values())) == {
        "g0": "keep-last",
        "b1": "failed-verification-only-in-slot",
        "g2": "keep-last",
    }
    assert out["b3"].reason is Reason.FAILED_VERIFICATION


def test_failed_verification_when_the_rule_runs_out_is_kept() -> None:
    cands = [snap("g", T0), snap("b", T0 - timedelta(days=1), verdict=VerifyVerdict.CHANGED)]
    assert kept(plan_prune(cands, KeepRules(daily=7))) == {
        "g": "keep-daily",
        "b": "failed-verification-only-in-slot",
    }


def test_needs_recovery_is_not_a_failed_verification() -> None:
    cands = [
        snap("crash", T0, verdict=VerifyVerdict.NEEDS_RECOVERY),
        snap("old", T0 - timedelta(hours=1)),
    ]
    assert kept(plan_prune(cands, KeepRules(last=1))) == {"crash": "keep-last"}


@pytest.mark.parametrize(
    ("rules", "code"),
    [
        (lambda: KeepRules(last=-1), "invalid-keep-rule"),
        (lambda: KeepRules(daily=True), "invalid-keep-rule"),
        (lambda: KeepRules(hourly="3"), "invalid-keep-rule"),  # type: ignore[arg-type]
    ],
)
def test_bad_rules_are_refused(rules: object, code: str) -> None:
    with pytest.raises(UsageError) as err:
        rules()  # type: ignore[operator]
    assert err.value.code == code


def test_bad_candidates_are_refused() -> None:
    with pytest.raises(UsageError) as err:
        plan_prune([snap("a", T0), snap("a", T0)], KeepRules(last=1))
    assert err.value.code == "invalid-argument"
    with pytest.raises(UsageError) as err:
        plan_prune([snap("a", datetime(2026, 1, 1))], KeepRules(last=1))
    assert err.value.code == "naive-time"


def test_rules_as_dict() -> None:
    assert KeepRules(last=3, daily=0, weekly=2).as_dict() == {"keep-last": 3, "keep-weekly": 2}


# ---------------------------------------------------------------------------- properties

VERDICTS: list[VerifyVerdict | None] = [None, *VerifyVerdict]


def random_case(rng: random.Random) -> tuple[list[Candidate], KeepRules]:
    n = rng.randint(0, 40)
    span = rng.choice([3600 * 6, 86400 * 3, 86400 * 60, 86400 * 800])
    cands = []
    for i in range(n):
        when = T0 - timedelta(seconds=rng.randint(0, span))
        status = rng.choices(
            [DONE, SnapshotStatus.FAILED, SnapshotStatus.RUNNING], weights=[8, 1, 1]
        )[0]
        verdict = rng.choices(VERDICTS, weights=[6, 3, 1, 1, 1, 1, 1])[0]
        cands.append(snap(f"s{i}", when, status, verdict, in_use=rng.random() < 0.05))
    counts: dict[str, int | None] = {
        k: rng.choice([None, 0, 1, 2, 3, 5]) for k in ("last", "hourly", "daily")
    }
    counts.update({k: rng.choice([None, 0, 1, 2]) for k in ("weekly", "monthly", "yearly")})
    rules = KeepRules(**counts)
    return cands, rules


@pytest.mark.parametrize("seed", range(300))
def test_properties(seed: int) -> None:
    rng = random.Random(seed)
    cands, rules = random_case(rng)
    out = plan_prune(cands, rules)
    dec = by_id(out)
    assert [d.id for d in out] == [c.id for c in cands]
    # input order does not matter
    shuffled = cands[:]
    rng.shuffle(shuffled)
    assert by_id(plan_prune(shuffled, rules)) == dec
    for c in cands:
        d = dec[c.id]
        if c.in_use or c.status is SnapshotStatus.RUNNING:
            assert d.keep, (c, d)
        if d.reason.value.startswith("keep-"):
            assert c.status is DONE
            assert not c.failed_verification
    # each rule keeps at most N snapshots, each in its own slot, the newest good one there
    good = [c for c in cands if c.status is DONE and not c.failed_verification]
    for rule, n in rules.active():
        mine = [c for c in cands if dec[c.id].reason.value == f"keep-{rule}"]
        assert len(mine) <= n
        slots = [slot_key(rule, c.created) for c in mine]
        assert len(set(slots)) == len(slots)
        for c, slot in zip(mine, slots, strict=True):
            newer_same_slot = [
                g
                for g in good
                if slot_key(rule, g.created) == slot and (g.created, g.id) > (c.created, c.id)
            ]
            # anything newer in that slot was decided by an earlier rule
            assert all(
                RULE_INDEX[dec[g.id].reason.value] < RULE_INDEX[f"keep-{rule}"]
                for g in newer_same_slot
                if dec[g.id].reason.value in RULE_INDEX
            )
    # a failed-verification snapshot kept as the only one of its slot: no good one there
    for c in cands:
        if dec[c.id].reason is Reason.FAILED_ONLY_IN_SLOT:
            assert c.failed_verification
    # the "never": a calendar slot whose done snapshots all failed verification
    # keeps one of them, however old
    for rule, _ in rules.active():
        if rule == "last":
            continue
        by_slot: dict[str, list[Candidate]] = {}
        for c in cands:
            if c.status is DONE:
                by_slot.setdefault(slot_key(rule, c.created), []).append(c)
        for members in by_slot.values():
            if all(m.failed_verification for m in members):
                assert any(dec[m.id].keep for m in members)
    # keep-last N keeps exactly min(N, #good) snapshots, the newest good ones
    if rules.last:
        newest = sorted(good, key=lambda c: (c.created, c.id), reverse=True)[: rules.last]
        assert {c.id for c in newest} == {
            c.id for c in cands if dec[c.id].reason is Reason.KEEP_LAST
        }
    # no rules: every done snapshot is kept
    if not rules.active():
        assert all(dec[c.id].keep for c in cands if c.status is DONE)


RULE_INDEX = {f"keep-{r}": i for i, r in enumerate(RULE_ORDER)}


@pytest.mark.parametrize("seed", range(200))
def test_prune_is_idempotent(seed: int) -> None:
    """Pruning what a prune kept prunes nothing more (a schedule's prune may run twice)."""
    cands, rules = random_case(random.Random(seed))
    cands = [c for c in cands if c.status is DONE]  # attempts are settled elsewhere
    first = by_id(plan_prune(cands, rules))
    survivors = [c for c in cands if first[c.id].keep]
    second = plan_prune(survivors, rules)
    assert all(d.keep for d in second), [d for d in second if not d.keep]


# ---------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("1d", 86400), ("2w", 1209600),
     ("1h30m", 5400), (" 1D ", 86400), ("90s", 90)],
)  # fmt: skip
def test_parse_every(text: str, seconds: int) -> None:
    assert parse_every(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0s", "0h0m", "h", "1", "1x", "-1h", "1.5h", "1h 30m", "m1"])
def test_parse_every_refuses(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_every(text)
    assert err.value.code == "invalid-interval"


def test_schedule_model() -> None:
    s = Schedule.parse("web1", "1h30m", KeepRules(last=3))
    assert s.every == timedelta(minutes=90)
    assert s.every_text == "1h30m"
    assert Schedule.parse("x", "86400s").every_text == "1d"
    with pytest.raises(UsageError):
        Schedule("x", timedelta(0))


def test_due_first_run_is_now() -> None:
    assert due(timedelta(hours=1), None, T0) == due(timedelta(hours=1), None, T0)
    d = due(timedelta(hours=1), None, T0)
    assert d.run
    assert d.at == T0
    assert d.missed == 0


def test_due_on_time_and_not_yet() -> None:
    every = timedelta(minutes=15)
    last = T0 - timedelta(minutes=10)
    d = due(every, last, T0)
    assert not d.run
    assert d.at == last + every
    d = due(every, last, last + every)
    assert d.run
    assert d.missed == 0


def test_missed_runs_run_once() -> None:
    """A server down for 10 hours with an hourly schedule runs once at start, then hourly."""
    every = timedelta(hours=1)
    last = T0 - timedelta(hours=10, minutes=30)
    d = due(every, last, T0)
    assert d.run
    assert d.missed == 9
    assert d.at == last + every
    # simulate the server ticking every 30 s for 3 hours after its start
    runs = []
    now = T0
    while now < T0 + timedelta(hours=3):
        if due(every, last, now).run:
            runs.append(now)
            last = now
        now += timedelta(seconds=30)
    assert runs == [T0, T0 + timedelta(hours=1), T0 + timedelta(hours=2)]


def test_clock_set_back_does_not_silence_a_schedule() -> None:
    every = timedelta(minutes=5)
    assert due(every, T0 + timedelta(days=1), T0).run
    assert not due(every, T0 + timedelta(minutes=1), T0).run  # small skew: wait


def test_due_refuses_naive_times() -> None:
    with pytest.raises(UsageError):
        due(timedelta(hours=1), None, datetime(2026, 1, 1))


def test_next_runs_soonest_first() -> None:
    a = Schedule.parse("a", "1h")
    b = Schedule.parse("b", "10m")
    c = Schedule.parse("c", "1d")
    order = next_runs([a, b, c], {"a": T0 - timedelta(minutes=30), "b": T0, "c": None}, T0)
    assert [(s.vm, d.run) for s, d in order] == [("c", True), ("b", False), ("a", False)]
