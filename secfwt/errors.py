"""The exception hierarchy of secfwt, and the one table that maps it to process exit codes.

Library code raises these; the CLI and the party processes turn them into exit codes through
:func:`exit_code_for` (daemons will map the same classes to gRPC status codes in one place).
Every message names the offending field or file and says how to fix it.
"""

from __future__ import annotations


class SecfwtError(Exception):
    """Base class of every error secfwt raises on purpose."""

    exit_code = 1


class ConfigError(SecfwtError):
    """A job or party configuration is malformed, has unknown keys, or has invalid values."""

    exit_code = 2


class ModelError(SecfwtError):
    """A model checkpoint is missing, unreadable, or of an unsupported architecture."""

    exit_code = 3


class DataError(SecfwtError):
    """A dataset is missing or malformed: columns, labels, lengths, shapes."""

    exit_code = 4


class FixedPointRangeError(SecfwtError):
    """A value would leave the range the fixed-point encoding represents exactly."""

    exit_code = 5


class DisclosureError(SecfwtError):
    """A reveal was attempted that the accepted disclosure terms do not allow."""

    exit_code = 6


class ProtocolError(SecfwtError):
    """The parties disagree, a party failed, or a party did not answer in time."""

    exit_code = 7


class PartyFailedError(ProtocolError):
    """Another party of the job exited or raised; carries that party's role and reason."""

    def __init__(self, role: str, reason: str) -> None:
        super().__init__(f"party {role!r} failed: {reason}")
        self.role = role
        self.reason = reason

    def __reduce__(self):  # keep the two-argument constructor picklable across processes
        return (type(self), (self.role, self.reason))


class ToleranceExceededError(SecfwtError):
    """A secure computation disagreed with its plaintext reference beyond the stated tolerance."""

    exit_code = 8


class PolicyError(ConfigError):
    """A job does not carry what the model owner's safety policy requires (refused before it
    runs, naming the missing item)."""


class SafetyGateWithheld(SecfwtError):
    """A job ran, but its safety gate kept the tuned parameters back (``withheld: safety``)."""

    exit_code = 9


def exit_code_for(exc: BaseException) -> int:
    """Process exit code for an exception: the class's code, 1 for a secfwt error without one,
    70 (EX_SOFTWARE) for anything unexpected."""
    if isinstance(exc, SecfwtError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 70
