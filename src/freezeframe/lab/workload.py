"""Reading what the lab guest's workload (``guest/ffwork``) left on its disks. Pure, no I/O.

The workload appends one line per round to ``/mnt/diskN/ffwork.log`` on every data disk,
always in disk order, each line starting with ``seq=<n> ``. So any consistent cut satisfies
``seq(disk0) >= seq(disk1) >= ... >= seq(disk0) - 1``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

__all__ = ["LOG_NAME", "MAXGAP_PATH", "SEQ_PATH", "check_invariant", "last_sequence"]

#: The workload's log file on every data disk (relative to the disk's mount point).
LOG_NAME = "ffwork.log"
#: Longest gap (ms) between two consecutive successful writes, in the guest.
MAXGAP_PATH = "/run/ffwork/maxgap_ms"
#: The last completed round, in the guest.
SEQ_PATH = "/run/ffwork/seq"

_RECORD = re.compile(rb"seq=(\d+) ")


def last_sequence(log_bytes: bytes) -> int | None:
    """The sequence number of the last complete record in a workload log, or None.

    A record is complete when its line ends with a newline; a torn last line is ignored, and
    so are lines that are not records (e.g. zero bytes a crash left in the tail), looking
    back to the last line that is one.
    """
    end = log_bytes.rfind(b"\n")
    while end >= 0:
        start = log_bytes.rfind(b"\n", 0, end) + 1
        m = _RECORD.match(log_bytes, start, end)
        if m:
            return int(m.group(1))
        end = start - 1
    return None


def check_invariant(seqs: Sequence[int]) -> bool:
    """True if per-disk sequence numbers (disk 0 first) can come from one consistent cut:
    ``seqs[0] >= seqs[1] >= ... >= seqs[-1] >= seqs[0] - 1``. Fewer than two disks: True.
    """
    if len(seqs) < 2:
        return True
    ordered = all(a >= b for a, b in itertools.pairwise(seqs))
    return ordered and seqs[-1] >= seqs[0] - 1
