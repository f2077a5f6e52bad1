"""The catalog: freezeframe's memory of VMs, snapshots, freeze intents and per-VM locks.

Owns the database. Nothing else in freezeframe talks SQL: the rest of the code calls
:class:`Catalog` and gets the frozen dataclasses of :mod:`freezeframe.models` back, never ORM
rows. SQLAlchemy 2 (typed ORM) is used synchronously; every public method is a coroutine that
runs its blocking work in a worker thread (``asyncio.to_thread``). Foreign errors
(``SQLAlchemyError``, ``sqlite3.Error``, alembic's ``CommandError``) become
:class:`~freezeframe.errors.CatalogError` here, with the original as ``__cause__``.

Database
    Any SQLAlchemy URL; by default a SQLite file in the state directory
    (:func:`freezeframe.paths.default_database_url`). The schema is portable (strings for
    enums, JSON for whole lists, aware UTC timestamps), so PostgreSQL works the same way.
    :meth:`Catalog.open` runs ``alembic upgrade head`` with the migrations shipped in
    ``catalog/migrations`` (revision ``0001`` creates every table, ``0002`` adds the libvirt
    address, ``0003`` what a VM lock is held for, ``0004`` a VM's overlay directory, ``0005``
    what a snapshot holds at its cut, ``0006`` a VM's Ceph settings, ``0007`` the indexes of
    a list's keyset pages, ``0008`` the snapshot schedules); production code never calls
    ``create_all``.

Tables
    ``vms``                  one row per registered VM (:class:`~freezeframe.models.VmConfig`;
                             ``exclude_mounts`` as a JSON list).
    ``snapshots``            one row per snapshot attempt: id, vm, created_at, status, policy,
                             level, level_reason, error, parent_id, freeze_window_ms, evidence
                             (JSON list of agent log lines); indexed on (created_at, id) and
                             (vm, created_at, id) for the pages of a list
                             (:meth:`Catalog.list_snapshot_summaries`: one query, counts and
                             flags computed by the database, no child rows loaded).
    ``snapshot_disks``       the disks of a snapshot, ``(snapshot_id, ordinal)``.
    ``snapshot_filesystems`` guest filesystems and whether each was frozen, same key.
    ``timeline_events``      the steps of a snapshot (name, t, mono_ns, detail), same key.
    ``verifications``        at most one per snapshot: the latest ``snapshot verify`` result.
    ``fs_checks``            the per-filesystem checks of that verification, same key.
    ``freeze_intents``       write-ahead freeze records: opened *before* ``guest-fsfreeze-freeze``
                             is sent, closed once a thaw is confirmed; an open intent after a
                             crash means "this guest may still be frozen".
    ``vm_locks``             one row per VM being snapshotted; the primary key is the lock.
    ``schedules``            one row per VM with a snapshot schedule: interval, keep rules,
                             quiesce, enabled, and the last run (``last_run_at`` is the claim
                             a server moves by compare-and-set before running a slot, so
                             several servers on one catalog run each slot once).
    ``alembic_version``      the schema revision.

Child rows are deleted with their snapshot (ORM cascade, and ``ON DELETE CASCADE``).

Several processes (and hosts sharing a server database)
    Every operation is one short transaction; nothing is held open between calls. SQLite runs
    in WAL mode (readers never block the writer) with a busy timeout of
    :data:`BUSY_TIMEOUT_MS`, both set on every new connection. A writing transaction starts
    with ``BEGIN IMMEDIATE``: it queues for the single write lock up front instead of upgrading
    a read snapshot that another writer may have made stale, which is what otherwise fails at
    once with "database is locked". Migrations run in such a transaction too, so processes
    opening a catalog at the same time migrate it exactly once.

    PostgreSQL gets the same guarantees: a writing transaction (READ COMMITTED) first takes a
    transaction-scoped advisory lock of the database (``pg_advisory_xact_lock``), so writers
    and migrations queue as SQLite's ``BEGIN IMMEDIATE`` writers do and every read-then-write
    runs alone; a reading transaction is ``REPEATABLE READ, READ ONLY`` (one snapshot for a
    record and its child rows, as a WAL reader has). Strings longer than their ``VARCHAR(n)``
    column are refused before the flush on every backend (SQLite would keep them, PostgreSQL
    refuses the statement). The tests run the catalog on both (``tests/conftest.py``).

    A missing SQLite file is created whole: migrated under a temporary name in its directory,
    then hard-linked into place only if the path is still free (one of racing processes wins,
    the others open its file). So a file at the catalog's path is never half made, and one that
    is empty, not SQLite, or SQLite without the catalog's tables is refused at once
    (:class:`~freezeframe.errors.CatalogError` naming it), never re-initialised.

    One snapshot per VM at a time: :meth:`Catalog.acquire_vm_lock` INSERTs the VM's row; the
    database's uniqueness makes exactly one of racing processes win. A loser reads the holder
    (``"<host>:<pid>:<random>"``, :func:`make_owner`): if it is a process of this host that is
    gone (no such pid, or the pid now belongs to a process started after the lock was taken),
    the lock is taken over in one transaction that deletes the row *only if it still names
    that holder* and inserts ours; otherwise :class:`~freezeframe.errors.BusyError` names the
    holder and since when it holds the lock. Holders on other hosts are never judged dead.
"""

from freezeframe._owner import holder_is_dead, make_owner
from freezeframe.catalog._catalog import BUSY_TIMEOUT_MS, MIN_PREFIX, Catalog, redact_url
from freezeframe.catalog._full import FILESYSTEM_FULL, CatalogFullError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "FILESYSTEM_FULL",
    "MIN_PREFIX",
    "Catalog",
    "CatalogFullError",
    "holder_is_dead",
    "make_owner",
    "redact_url",
]
