"""The QEMU guest-agent (QGA) client.

Public API: :class:`Agent` (the interface drivers supply, :mod:`freezeframe.agent.base`),
:class:`GuestAgent` (typed commands over one serialized connection, see
:mod:`freezeframe.agent.client`) and the transport interface tests can plug in
(:class:`Transport`, :data:`Connector`, :class:`UnixTransport`; see
:mod:`freezeframe.agent.protocol`). Every error is an
:class:`~freezeframe.errors.AgentError` subclass.
"""

from __future__ import annotations

from freezeframe.agent.base import Agent
from freezeframe.agent.client import FREEZE_ALLOWED_COMMANDS, GuestAgent
from freezeframe.agent.protocol import Connector, Transport, UnixTransport, unix_connector

__all__ = [
    "FREEZE_ALLOWED_COMMANDS",
    "Agent",
    "Connector",
    "GuestAgent",
    "Transport",
    "UnixTransport",
    "unix_connector",
]
