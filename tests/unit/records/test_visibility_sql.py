"""How ``SqlSearch.visibility`` renders and caches a consent filter's SQL (compiled only, no
database: that the rendered SQL returns the right rows is
tests/integration/test_consent.py::test_the_sql_of_a_consent_filter_returns_exactly_the_rows_the_pure_filter_allows)."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.elements import TextClause

from teleledger.core.crypto import KeyedHash
from teleledger.fhir import query as fq
from teleledger.policy import model as pm
from teleledger.records.index import label_hashes
from teleledger.records.search import SqlSearch, Visibility, hint_parameters, patient_hint

DIALECTS = [sqlite.dialect(), postgresql.dialect()]
PSY = pm.AnyLabel(frozenset({"PSY"}))


def consented(*patients: str) -> tuple[SqlSearch, Visibility]:
    search = SqlSearch(KeyedHash(b"k" * 32))
    f = pm.Consented(care_team_of="doc-1", break_glass=frozenset({patients[0]}),
                     permits=((frozenset(patients), pm.TypeIn(frozenset({"Observation"}))),),
                     denies=((frozenset(patients[:1]), PSY),), practitioner_id="doc-1")
    return search, Visibility("consented", consented=f, label_hash=lambda label: label_hashes(search.h, label)[0])


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_consent_filter_is_rendered_once_with_its_patients_written_in(dialect) -> None:  # type: ignore[no-untyped-def]
    search, vis = consented("pat-1", "pat-2")
    first, params = search.visibility(vis, dialect)
    again, _ = search.visibility(vis, dialect)
    assert again is first and params == {}
    sql = str(first.compile(dialect=dialect))
    assert "'pat-1'" in sql and "'pat-2'" in sql and "'doc-1'" in sql


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_hinted_filter_is_one_text_for_every_patient_with_the_patient_as_a_parameter(dialect) -> None:  # type: ignore[no-untyped-def]
    search, vis = consented("pat-1", "pat-2")
    one, params_one = search.visibility(vis, dialect, patient="pat-1")
    two, params_two = search.visibility(vis, dialect, patient="pat-2")
    assert isinstance(one, TextClause) and one is two
    assert params_one == {"consent_hint": "pat-1", "consent_g": True, "consent_d0": True, "consent_p0": True}
    assert params_two == {"consent_hint": "pat-2", "consent_g": False, "consent_d0": False, "consent_p0": True}
    assert set(one._bindparams) == {"consent_hint", "consent_g", "consent_d0", "consent_p0"}


@pytest.mark.parametrize("dialect", DIALECTS, ids=lambda d: d.name)
def test_a_filter_naming_a_value_that_would_need_quoting_keeps_bound_parameters(dialect) -> None:  # type: ignore[no-untyped-def]
    search, vis = consented("o'brien", "pat-2")
    for hint in (None, "pat-2"):
        clause, params = search.visibility(vis, dialect, patient=hint)
        compiled = clause.compile(dialect=dialect)
        assert "o'brien" not in str(compiled) and "o''brien" not in str(compiled)
        assert ["o'brien", "pat-2"] in compiled.params.values() or ["o'brien"] in compiled.params.values()
        assert params == {}


def test_hint_parameters_say_which_groups_hold_the_patient() -> None:
    f = pm.Consented(permits=((frozenset({"a"}), PSY), (frozenset({"b"}), PSY)), denies=((frozenset({"a", "b"}), PSY),))
    assert hint_parameters(f, "b") == {"consent_hint": "b", "consent_g": False, "consent_d0": True,
                                       "consent_p0": False, "consent_p1": True}


@pytest.mark.parametrize(("items", "expected"), [
    ([("patient", "p-1")], "p-1"),
    ([("subject", "Patient/p-1"), ("code", "8867-4")], "p-1"),
    ([("code", "8867-4")], None),
    ([("subject", "Group/g-1")], None),
    ([("patient", "p-1,p-2")], None),
])
def test_the_patient_hint_is_the_one_patient_a_search_names(items, expected) -> None:  # type: ignore[no-untyped-def]
    assert patient_hint(fq.parse_search("Observation", items)) == expected
