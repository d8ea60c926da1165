"""Errors raised by the audit package.

Every error is an :class:`AuditError`, so a caller that must fail closed (stop
before performing an action that could not be recorded) can catch one type.
Tampering found by :func:`fedmeta.audit.verify_log` is *not* an exception: it
is reported in the :class:`~fedmeta.audit.verify.VerifyResult`.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every audit-log error."""


class InvalidEntryError(AuditError, ValueError):
    """A value given to the log is not allowed in an audit entry (type, size, format)."""


class ReceiptFormatError(AuditError, ValueError):
    """A receipt string is not of the form ``SEQ:HASH``."""


class KeyFileError(AuditError):
    """A key file is missing, unreadable, malformed or has unsafe permissions."""


class LogStateError(AuditError):
    """A log cannot be appended to safely (partial tail, wrong key, corrupt last entry)."""


class PartialTailError(LogStateError):
    """The log ends with an incomplete line (e.g. a crash in the middle of an append)."""


class AuditWriteError(AuditError):
    """Writing or syncing an entry failed; the recorded action must not be performed."""


class AuditReadError(AuditError):
    """A log or key file given to the verifier could not be read."""
