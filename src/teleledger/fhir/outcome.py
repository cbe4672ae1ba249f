"""OperationOutcome construction (https://hl7.org/fhir/R4/operationoutcome.html)."""

from __future__ import annotations

from teleledger.core.errors import TeleledgerError


def outcome(severity: str, code: str, text: str, *, expression: str | None = None) -> dict:
    issue: dict = {"severity": severity, "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def from_error(err: TeleledgerError) -> dict:
    severity = "error" if err.status < 500 else "fatal"
    return outcome(severity, err.issue_code, err.message, expression=err.expression)


def information(text: str) -> dict:
    return outcome("information", "informational", text)
