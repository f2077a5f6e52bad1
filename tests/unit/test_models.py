"""Rules that live on the models themselves."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from freezeframe.models import (
    ConsistencyLevel,
    QuiescePolicy,
    SnapshotRecord,
    SnapshotStatus,
    TimelineEvent,
)

T = datetime(2026, 11, 26, tzinfo=UTC)


def _rec(*names: str) -> SnapshotRecord:
    return SnapshotRecord(
        id="s",
        vm="v",
        created_at=T,
        status=SnapshotStatus.DONE,
        policy=QuiescePolicy.REQUIRED,
        level=ConsistencyLevel.FILESYSTEM,
        timeline=tuple(TimelineEvent(n, T, i) for i, n in enumerate(names)),
    )


@pytest.mark.parametrize(
    ("names", "unconfirmed"),
    [
        ((), False),
        (("freeze_sent", "thawed", "thaw_confirmed"), False),
        (("freeze_sent", "thaw_failed", "thaw_unconfirmed"), True),
        (("freeze_sent", "thaw_unconfirmed", "cut_verified", "thaw_confirmed"), False),
        (("thaw_unconfirmed", "thaw_confirmed", "thaw_unconfirmed"), True),
    ],
)
def test_thaw_unconfirmed_until_someone_confirms(names: tuple[str, ...], unconfirmed: bool) -> None:
    assert _rec(*names).thaw_unconfirmed is unconfirmed
