"""The one exception tree of teleledger.

Every error a caller can cause is a ``TeleledgerError``; the web layer turns it into an
``OperationOutcome`` in exactly one place (``teleledger.web.errors``) and the CLI into a message
and a non-zero exit. Foreign exceptions are translated at the boundary with ``raise ... from``.

    TeleledgerError
    ├── InvalidInput            400  malformed JSON, bad parameter, invalid resource
    │   ├── Unprocessable       422  well-formed but breaks a business rule / profile
    │   └── UnsupportedMediaType 415 a content type outside an allowlist (attachments)
    ├── Unauthenticated         401  no, expired or tampered credentials
    ├── Forbidden               403  authenticated but not allowed
    ├── NotFound                404
    │   └── Gone                410  the resource was deleted
    ├── MethodNotAllowed        405
    ├── Conflict                409
    ├── PreconditionFailed      412  stale If-Match
    ├── PayloadTooLarge         413
    └── ConfigurationError      (start-up only; never reaches a client)

This module must never import a framework: it is used by the pure cores.
"""

from __future__ import annotations


class TeleledgerError(Exception):
    """Root of every error teleledger raises on purpose."""

    status: int = 500
    #: FHIR IssueType code (http://hl7.org/fhir/issue-type)
    issue_code: str = "exception"

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression


class InvalidInput(TeleledgerError):
    status = 400
    issue_code = "invalid"


class Unprocessable(InvalidInput):
    status = 422
    issue_code = "processing"


class Unauthenticated(TeleledgerError):
    status = 401
    issue_code = "login"


class Forbidden(TeleledgerError):
    status = 403
    issue_code = "forbidden"


class AccessDenied(Forbidden):
    """A policy denial, carrying what the audit trail records about it (never PHI): the action,
    the rule that denied it and the patients concerned."""

    def __init__(self, message: str, *, action: str, reason: str, patients: frozenset[str]) -> None:
        super().__init__(message)
        self.action = action
        self.reason = reason
        self.patients = patients


class NotFound(TeleledgerError):
    status = 404
    issue_code = "not-found"


class Gone(NotFound):
    status = 410
    issue_code = "deleted"


class MethodNotAllowed(TeleledgerError):
    status = 405
    issue_code = "not-supported"


class Conflict(TeleledgerError):
    status = 409
    issue_code = "conflict"


class PreconditionFailed(TeleledgerError):
    status = 412
    issue_code = "conflict"


class PayloadTooLarge(TeleledgerError):
    status = 413
    issue_code = "too-costly"


class UnsupportedMediaType(InvalidInput):
    status = 415
    issue_code = "not-supported"


class ConfigurationError(TeleledgerError):
    """Raised at start-up when settings are unsafe or inconsistent."""

    status = 500
    issue_code = "exception"
