"""The attachment gate: size limit first, then the allowlist, then the bytes must match the type."""

from __future__ import annotations

import pytest

from teleledger.core.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from teleledger.visits.attachments import (
    ALLOWED_TYPES,
    DEFAULT_MAX_BYTES,
    AttachmentTooLarge,
    AttachmentTypeNotAllowed,
    EmptyAttachment,
    check_attachment,
    normalize_content_type,
)

PDF = b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 17
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 20
TEXT = "Blood pressure this morning: 128/82, pulse 71.\n".encode()


@pytest.mark.parametrize(("ctype", "data"), [
    ("application/pdf", PDF), ("image/png", PNG), ("image/jpeg", JPEG), ("text/plain", TEXT),
    ("text/plain; charset=utf-8", "Température 37,8 °C".encode()), ("IMAGE/PNG", PNG),
])
def test_each_allowed_type_with_matching_bytes_passes(ctype, data):
    assert check_attachment(ctype, data, max_bytes=1024) is None


def test_a_file_one_byte_over_the_limit_is_413_and_one_at_the_limit_passes():
    at_limit = PDF + b" " * (200 - len(PDF))
    check_attachment("application/pdf", at_limit, max_bytes=200)
    with pytest.raises(AttachmentTooLarge) as caught:
        check_attachment("application/pdf", at_limit + b" ", max_bytes=200)
    assert isinstance(caught.value, PayloadTooLarge) and caught.value.status == 413
    assert caught.value.message == "the file is 201 bytes; files may be at most 200 bytes"


def test_the_size_is_checked_before_the_type_so_a_huge_file_of_any_type_is_413():
    with pytest.raises(AttachmentTooLarge, match=r"6\.0 MB; files may be at most 5\.0 MB"):
        check_attachment("video/mp4", b"\x00" * (6 * 1024 * 1024), max_bytes=DEFAULT_MAX_BYTES)


@pytest.mark.parametrize("ctype", ["text/html", "image/svg+xml", "application/x-msdownload", "video/mp4",
                                   "application/octet-stream", "image/jpg"])
def test_a_type_outside_the_allowlist_is_415_naming_the_allowed_types(ctype):
    with pytest.raises(AttachmentTypeNotAllowed) as caught:
        check_attachment(ctype, PDF, max_bytes=1024)
    err = caught.value
    assert isinstance(err, UnsupportedMediaType) and isinstance(err, InvalidInput) and err.status == 415
    assert f"files of type {ctype} cannot be attached" in err.message
    assert "PDF (application/pdf), PNG image (image/png), JPEG image (image/jpeg), plain text (text/plain)" in err.message


@pytest.mark.parametrize(("ctype", "data"), [
    ("image/png", b"<html><script>alert(1)</script></html>"), ("application/pdf", PNG), ("image/jpeg", PNG),
    ("image/png", JPEG), ("application/pdf", b"%PD"),
])
def test_bytes_that_are_not_what_the_declared_type_says_are_415(ctype, data):
    with pytest.raises(AttachmentTypeNotAllowed, match="says it is a .* but its content is not"):
        check_attachment(ctype, data, max_bytes=1024)


def test_plain_text_must_be_utf8_without_nul_bytes():
    with pytest.raises(AttachmentTypeNotAllowed, match="not valid UTF-8"):
        check_attachment("text/plain", b"\xff\xfe caf\xe9", max_bytes=1024)
    with pytest.raises(AttachmentTypeNotAllowed, match="NUL bytes"):
        check_attachment("text/plain", b"MZ\x00\x00PE", max_bytes=1024)
    with pytest.raises(AttachmentTypeNotAllowed, match="must be UTF-8"):
        check_attachment("text/plain; charset=iso-8859-1", b"cafe", max_bytes=1024)


def test_an_empty_file_or_a_missing_type_is_refused_clearly():
    with pytest.raises(EmptyAttachment, match="the file is empty") as caught:
        check_attachment("text/plain", b"", max_bytes=1024)
    assert caught.value.status == 400
    with pytest.raises(AttachmentTypeNotAllowed, match="has no content type"):
        check_attachment("  ", TEXT, max_bytes=1024)


def test_a_limit_below_one_byte_is_a_programming_error_not_a_client_error():
    with pytest.raises(ValueError):
        check_attachment("text/plain", TEXT, max_bytes=0)


def test_the_normalized_type_drops_parameters_and_case():
    assert normalize_content_type(" Text/Plain ; charset=\"UTF-8\"") == "text/plain"
    assert set(ALLOWED_TYPES) == {"application/pdf", "image/png", "image/jpeg", "text/plain"}


def test_the_message_never_echoes_the_file_content():
    secret = b"<html>Patient Jane Doe HIV positive</html>"
    with pytest.raises(AttachmentTypeNotAllowed) as caught:
        check_attachment("image/png", secret, max_bytes=1024)
    assert "Jane" not in caught.value.message and "html" not in caught.value.message
