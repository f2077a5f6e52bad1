"""Fakes that speak the real wire protocols on real sockets, for unit and error-path tests."""

from tests.fakes.fake_agent import FREEZE_ALLOWED, Behaviour, FakeAgent, FakeExec, FakeFs

__all__ = ["FREEZE_ALLOWED", "Behaviour", "FakeAgent", "FakeExec", "FakeFs"]
