"""The purpose of use a request has when it does not say, per role, in one place."""

from __future__ import annotations

import pytest

from teleledger.core.errors import InvalidInput
from teleledger.web.deps import request_purpose


@pytest.mark.parametrize(("role", "purpose"), [("pharmacist", "TREAT"), ("payer", "HPAYMT"), ("researcher", "HRESCH"),
                                               ("practitioner", "TREAT"), ("patient", "TREAT"), ("admin", "HOPERAT")])
def test_each_role_has_a_default_purpose_of_use(role, purpose):
    assert request_purpose(role) == purpose


def test_in_the_portal_a_patient_acts_on_their_own_request_and_other_roles_keep_their_default():
    assert request_purpose("patient", portal=True) == "PATRQT"
    assert request_purpose("payer", portal=True) == "HPAYMT"


def test_an_explicit_known_purpose_wins_over_the_default():
    assert request_purpose("payer", "treat") == "TREAT"
    assert request_purpose("payer", " COVERAGE ") == "COVERAGE"
    assert request_purpose("payer", "") == "HPAYMT"


def test_an_unknown_purpose_is_refused_with_a_message_not_replaced():
    with pytest.raises(InvalidInput, match="not a purpose of use"):
        request_purpose("payer", "SHOPPING")
