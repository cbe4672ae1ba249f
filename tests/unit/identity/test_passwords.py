"""Password hashing and policy (teleledger.identity.passwords)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teleledger.core.errors import InvalidInput
from teleledger.identity.passwords import (
    Hasher,
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_password,
)

# Production parameters (RFC 9106 low-memory) in PHC form, with a dummy salt and digest: reading
# parameters does not need a real hash, and making one would cost 64 MiB.
PRODUCTION_SHAPED_HASH = "$argon2id$v=19$m=65536,t=3,p=4$c29tZXNhbHRzb21lc2FsdA$" + "A" * 43


@pytest.fixture(scope="module")
def hasher() -> Hasher:
    return Hasher.for_tests()


def test_hash_is_an_argon2id_phc_string_with_the_test_parameters(hasher):
    assert hasher.hash("correct horse battery").startswith("$argon2id$v=19$m=8192,t=1,")


def test_correct_password_verifies(hasher):
    assert hasher.verify(hasher.hash("correct horse battery"), "correct horse battery") is True


def test_wrong_password_returns_false_instead_of_raising(hasher):
    assert hasher.verify(hasher.hash("correct horse battery"), "correct horse batterY") is False


@pytest.mark.parametrize("stored", ["", "garbage", "$argon2id$v=19$m=8192,t=1,p=4$bad", "$2b$12$bcryptlookingstuff"])
def test_corrupt_stored_hash_returns_false_instead_of_raising(hasher, stored):
    assert hasher.verify(stored, "correct horse battery") is False


def test_unknown_account_verifies_against_a_dummy_and_returns_false(hasher):
    assert hasher.verify(None, "correct horse battery") is False
    assert hasher.verify(None, "teleledger dummy password for unknown accounts") is False


def test_same_password_hashes_differently_each_time(hasher):
    assert hasher.hash("correct horse battery") != hasher.hash("correct horse battery")


def test_differently_composed_accents_verify_as_the_same_password(hasher):
    composed = unicodedata.normalize("NFC", "café crème brûlée")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert hasher.verify(hasher.hash(composed), decomposed) is True


def test_hash_made_with_the_test_parameters_needs_rehash_in_production(hasher):
    cheap = hasher.hash("correct horse battery")
    assert hasher.needs_rehash(cheap) is False
    assert Hasher().needs_rehash(cheap) is True
    assert needs_rehash(cheap) is True


def test_production_hasher_uses_the_rfc_9106_low_memory_profile(hasher):
    assert Hasher().needs_rehash(PRODUCTION_SHAPED_HASH) is False
    assert hasher.needs_rehash(PRODUCTION_SHAPED_HASH) is True


def test_unreadable_hash_needs_rehash(hasher):
    assert hasher.needs_rehash("garbage") is True


def test_module_functions_hash_and_verify_with_production_parameters():
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert verify_password(stored, "correct horse battery") is True
    assert verify_password(stored, "wrong horse battery") is False
    assert verify_password(None, "correct horse battery") is False


@settings(max_examples=15, deadline=None)
@given(password=st.text(min_size=1, max_size=40), other=st.text(min_size=1, max_size=40))
def test_a_hash_verifies_its_own_password_and_no_other(hasher, password, other):
    stored = hasher.hash(password)
    assert hasher.verify(stored, password)
    if unicodedata.normalize("NFKC", other) != unicodedata.normalize("NFKC", password):
        assert not hasher.verify(stored, other)


# -- policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("password", ["correct horse battery", "12345678", "pässwörd", "a1a1a1a1", "xy" * 512])
def test_passwords_meeting_the_policy_pass(password):
    check_password_policy(password)


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "at least 8"),
        ("short1!", "at least 8"),
        ("aaaaaaaaaaaa", "repeated"),
        ("            ", "repeated"),
        ("xy" * 512 + "z", "at most 1024"),
    ],
)
def test_passwords_breaking_the_policy_are_invalid_input(password, fragment):
    with pytest.raises(InvalidInput) as raised:
        check_password_policy(password)
    assert raised.value.status == 400
    assert fragment in raised.value.message


def test_policy_message_never_contains_the_password():
    with pytest.raises(InvalidInput) as raised:
        check_password_policy("hunter2")
    assert "hunter2" not in str(raised.value)


def test_policy_counts_characters_not_bytes():
    check_password_policy("日本語のパスワード")  # 9 characters, 27 bytes
    with pytest.raises(InvalidInput):
        check_password_policy("日本語パス")  # 5 characters, 15 bytes


def test_policy_rejects_a_non_string():
    with pytest.raises(InvalidInput):
        check_password_policy(12345678)  # type: ignore[arg-type]
