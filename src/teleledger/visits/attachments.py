"""The one check every file a person attaches must pass: size limit and type allowlist.

Used by secure messaging (``visits.messaging``) and the visit room's chat (``visits.rooms``)
before an attachment is put into a FHIR ``Attachment`` (``contentType`` + base64 ``data``) and
stored. ``check_attachment`` raises before anything is written, so a refused file leaves
nothing behind.

What is allowed, and why:

============== ============================================ =====================================
content type   the bytes must start with (or be)            why
============== ============================================ =====================================
application/pdf ``%PDF-``                                   letters, results, referrals
image/png      ``89 50 4E 47 0D 0A 1A 0A``                  photos and screenshots
image/jpeg     ``FF D8 FF``                                 photos
text/plain     UTF-8 text without NUL (``charset`` may only short notes, readings
               be utf-8 or us-ascii)
============== ============================================ =====================================

The declared type must match the bytes: a file that says ``image/png`` but holds HTML or a
script would be served back to a browser under a type the allowlist never meant to admit. The
magic numbers are the ones the formats define (ISO 32000 §7.5.2, PNG §5.2, JPEG SOI marker);
a four-line check needs no library.

Errors (both clear 4xx, never a 500):

    PayloadTooLarge           413  AttachmentTooLarge: more bytes than ``max_bytes``
    InvalidInput              400  EmptyAttachment: no bytes at all
    └── UnsupportedMediaType  415  AttachmentTypeNotAllowed: type outside the allowlist, or
                                   bytes that are not what the type says

This module is pure (no I/O) and must never log or echo the file's bytes: they are PHI.
"""

from __future__ import annotations

from typing import Final

from teleledger.core.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

__all__ = [
    "ALLOWED_TYPES",
    "DEFAULT_MAX_BYTES",
    "AttachmentTooLarge",
    "AttachmentTypeNotAllowed",
    "EmptyAttachment",
    "check_attachment",
    "normalize_content_type",
]

#: a default the callers may lower: a phone photo fits, a video does not
DEFAULT_MAX_BYTES: Final[int] = 5 * 1024 * 1024

_PDF, _PNG, _JPEG, _TEXT = "application/pdf", "image/png", "image/jpeg", "text/plain"
#: allowed content type → what a person calls it (for error messages and the upload form)
ALLOWED_TYPES: Final[dict[str, str]] = {_PDF: "PDF", _PNG: "PNG image", _JPEG: "JPEG image", _TEXT: "plain text"}
_MAGIC: Final[dict[str, bytes]] = {_PDF: b"%PDF-", _PNG: b"\x89PNG\r\n\x1a\n", _JPEG: b"\xff\xd8\xff"}
_TEXT_CHARSETS: Final[frozenset[str]] = frozenset({"utf-8", "utf8", "us-ascii"})


class AttachmentTooLarge(PayloadTooLarge):
    """The file has more bytes than the limit."""


class AttachmentTypeNotAllowed(UnsupportedMediaType):
    """The content type is not on the allowlist, or the bytes are not of the declared type."""


class EmptyAttachment(InvalidInput):
    """The file has no bytes."""


def _allowed_list() -> str:
    return ", ".join(f"{label} ({ctype})" for ctype, label in ALLOWED_TYPES.items())


def _size_text(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


def normalize_content_type(content_type: str) -> str:
    """``"Text/Plain; charset=UTF-8"`` → ``"text/plain"``; raises ``AttachmentTypeNotAllowed``
    for a type outside the allowlist or a text charset other than UTF-8/ASCII."""
    if not isinstance(content_type, str) or not content_type.strip():
        raise AttachmentTypeNotAllowed(f"the file has no content type; allowed are {_allowed_list()}",
                                       expression="contentType")
    base, _, params = content_type.partition(";")
    ctype = base.strip().lower()
    if ctype not in ALLOWED_TYPES:
        shown = ctype[:80] if ctype.isprintable() else "an unreadable type"
        raise AttachmentTypeNotAllowed(f"files of type {shown} cannot be attached; allowed are {_allowed_list()}",
                                       expression="contentType")
    if ctype == _TEXT:
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in _TEXT_CHARSETS:
                raise AttachmentTypeNotAllowed("plain-text files must be UTF-8 (charset=utf-8)",
                                               expression="contentType")
    return ctype


def check_attachment(content_type: str, data: bytes, *, max_bytes: int) -> None:
    """Refuse a file that is empty, larger than ``max_bytes``, of a type outside the allowlist or
    whose bytes are not of its declared type. Returns None when the file may be stored.

    The size is checked first, so a huge upload is refused without looking at its content."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be a positive number of bytes")
    size = len(data)
    if size > max_bytes:
        raise AttachmentTooLarge(f"the file is {_size_text(size)}; files may be at most {_size_text(max_bytes)}",
                                 expression="data")
    if size == 0:
        raise EmptyAttachment("the file is empty", expression="data")
    ctype = normalize_content_type(content_type)
    label = ALLOWED_TYPES[ctype]
    if ctype == _TEXT:
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise AttachmentTypeNotAllowed("the file says it is plain text but is not valid UTF-8 text",
                                           expression="data") from None
        if "\x00" in text:
            raise AttachmentTypeNotAllowed("the file says it is plain text but holds binary data (NUL bytes)",
                                           expression="data")
        return
    if not bytes(data[: len(_MAGIC[ctype])]) == _MAGIC[ctype]:
        raise AttachmentTypeNotAllowed(f"the file says it is a {label} ({ctype}) but its content is not; "
                                       f"allowed are {_allowed_list()}", expression="data")
