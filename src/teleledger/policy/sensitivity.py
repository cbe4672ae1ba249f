"""Sensitivity labels of a FHIR resource: the data categories a patient's consent can single out.

A label is one of five HL7 v3 ActCode information-sensitivity codes
(http://terminology.hl7.org/CodeSystem/v3-ActCode, value set ActInformationSensitivityPolicy),
chosen as the canonical name of each category the consent model speaks about:

=======  ==========================================  =========================================
label    category                                    other v3 ActCode codes folded into it
=======  ==========================================  =========================================
PSY      mental health                               MH, BH, PSYTHPN
HIV      HIV/AIDS                                    —
ETH      substance use (alcohol and drugs)           SUD, ETHUD, OPIOIDUD
GDIS     genetics (genetic disease information)      —
SEX      sexual and reproductive health              STD, PREGNANT
=======  ==========================================  =========================================

Other sensitivity codes (SDV, MST, SCA, TBOO, VIO ...) and the confidentiality codes of
v3-Confidentiality (N, R, V ...) are not categories a consent here can name, so they give no label.

``classify(resource)`` reads two sources and returns the union:

1. ``meta.security`` codings whose system is v3 ActCode, through the table above. A code
   without a system is ignored: a bare "HIV" could mean anything.
2. Well-known clinical codes in the elements ``code``, ``category``, ``type``, ``reasonCode``,
   ``valueCodeableConcept`` and ``conclusionCode`` (all CodeableConcepts):

   * ICD-10 and ICD-10-CM (``http://hl7.org/fhir/sid/icd-10``, ``.../icd-10-cm``; dots ignored):
     F00–F99 → PSY, and F10–F19 (disorders due to psychoactive substance use) → ETH as well;
     B20–B24, Z21, R75 → HIV; O98.7 → HIV and SEX; O00–O9A (pregnancy and childbirth),
     Z30–Z39 (contraception, procreation, pregnancy supervision), A50–A64 (infections with a
     predominantly sexual mode of transmission), N46 and N97 (infertility) → SEX;
     Q90–Q99 (chromosomal abnormalities), Z14, Z15 (genetic carrier, genetic susceptibility) → GDIS.
   * LOINC (``http://loinc.org``) and SNOMED CT (``http://snomed.info/sct``): the short lists
     ``LOINC_LABELS`` and ``SNOMED_LABELS`` below (HIV tests, genetic variant reports, PHQ/GAD
     mental-health instruments, substance-use screening, pregnancy and contraception codes —
     including those the bundled Synthea sample uses).
   * HL7 v2 table 0074 (``http://terminology.hl7.org/CodeSystem/v2-0074``) ``GE`` (genetics, a
     DiagnosticReport category) → GDIS.

The code lists are deliberately small and written down here: without a terminology server they
cannot follow SNOMED's hierarchy or the SAMHSA value sets, so a resource that matters should carry
its label in ``meta.security`` (which the clinician's UI sets). Classification only ever adds
labels; a label makes data *harder* to reach (a deny on the label hides it, and a permit must
cover every label the resource carries).

Pure core: this module must never perform I/O, and never log a resource.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "ACTCODE_SYSTEM",
    "LABELS",
    "LABEL_NAMES",
    "LOINC_LABELS",
    "SECURITY_CODE_LABELS",
    "SNOMED_LABELS",
    "classify",
    "icd10_labels",
    "normalize_label",
]

ACTCODE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ICD10_SYSTEMS: Final = frozenset({"http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm"})
LOINC_SYSTEM: Final = "http://loinc.org"
SNOMED_SYSTEM: Final = "http://snomed.info/sct"
V2_0074_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v2-0074"

PSY, HIV, ETH, GDIS, SEX = "PSY", "HIV", "ETH", "GDIS", "SEX"

#: the canonical labels, and what each means to a patient
LABEL_NAMES: Final[Mapping[str, str]] = MappingProxyType(
    {
        PSY: "mental health",
        HIV: "HIV/AIDS",
        ETH: "substance use",
        GDIS: "genetics",
        SEX: "sexual and reproductive health",
    }
)
LABELS: Final[frozenset[str]] = frozenset(LABEL_NAMES)

#: v3 ActCode sensitivity code → canonical label
SECURITY_CODE_LABELS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "PSY": PSY,
        "MH": PSY,
        "BH": PSY,
        "PSYTHPN": PSY,
        "HIV": HIV,
        "ETH": ETH,
        "SUD": ETH,
        "ETHUD": ETH,
        "OPIOIDUD": ETH,
        "GDIS": GDIS,
        "SEX": SEX,
        "STD": SEX,
        "PREGNANT": SEX,
    }
)

_P, _H, _E, _G, _S = frozenset({PSY}), frozenset({HIV}), frozenset({ETH}), frozenset({GDIS}), frozenset({SEX})
_PE = frozenset({PSY, ETH})
_HS = frozenset({HIV, SEX})

LOINC_LABELS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        # HIV tests
        "7917-8": _H,  # HIV 1 Ab [Presence] in Serum
        "7918-6": _H,  # HIV 1+2 Ab [Presence] in Serum
        "7919-4": _H,  # HIV 2 Ab [Presence] in Serum
        "5221-7": _H,  # HIV 1 Ab [Presence] in Serum or Plasma by Immunoblot
        "56888-1": _H,  # HIV 1+2 Ab+HIV1 p24 Ag [Presence] in Serum or Plasma by Immunoassay
        "75622-1": _H,  # HIV 1 and 2 tests - Meaningful Use set
        "20447-9": _H,  # HIV 1 RNA [#/volume] (viral load) in Serum or Plasma
        # genetics
        "51969-4": _G,  # Genetic analysis report
        "81247-9": _G,  # Master HL7 genetic variant reporting panel
        "69548-6": _G,  # Genetic variant assessment
        "48018-6": _G,  # Gene studied [ID]
        # mental health instruments
        "44249-1": _P,  # PHQ-9 quick depression assessment panel
        "44261-6": _P,  # Patient Health Questionnaire 9 item (PHQ-9) total score
        "55757-9": _P,  # Patient Health Questionnaire 2 item (PHQ-2) panel
        "69737-5": _P,  # Generalized anxiety disorder 7 item (GAD-7)
        "70274-6": _P,  # Generalized anxiety disorder 7 item (GAD-7) total score
        # substance use instruments
        "72109-2": _E,  # AUDIT-C
        "75626-2": _E,  # AUDIT-C total score
    }
)

SNOMED_LABELS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        # mental health
        "74732009": _P,  # Mental disorder
        "35489007": _P,  # Depressive disorder
        "370143000": _P,  # Major depressive disorder
        "197480006": _P,  # Anxiety disorder
        "80583007": _P,  # Severe anxiety (panic)
        "171207006": _P,  # Depression screening
        "454711000124102": _P,  # Depression screening using PHQ-2
        "715252007": _P,  # Depression screening using PHQ-9
        "710841007": _P,  # Assessment of anxiety
        # substance use
        "66214007": _E,  # Substance abuse
        "7200002": _E,  # Alcoholism
        "10939881000119105": _E,  # Unhealthy alcohol drinking behavior
        "361055000": _E,  # Misuses drugs
        "428211000124100": _E,  # Assessment of substance use
        "713106006": _E,  # Screening for drug abuse
        "763302001": _E,  # Assessment using AUDIT-C
        # HIV
        "86406008": _H,  # Human immunodeficiency virus infection
        "62479008": _H,  # Acquired immune deficiency syndrome
        "165816005": _H,  # Human immunodeficiency virus positive
        # sexual and reproductive health
        "72892002": _S,  # Normal pregnancy
        "19169002": _S,  # Miscarriage in first trimester
        "156073000": _S,  # Complete miscarriage
        "252160004": _S,  # Standard pregnancy test
        "10383002": _S,  # Counseling for termination of pregnancy
        "386394001": _S,  # Pregnancy termination care
        "714812005": _S,  # Induced termination of pregnancy
        "236974004": _S,  # Instrumental delivery
        "169553002": _S,  # Insertion of subcutaneous contraceptive
        "301807007": _S,  # Removal of subcutaneous contraceptive
        "65200003": _S,  # Insertion of intrauterine contraceptive device
        "46706006": _S,  # Replacement of contraceptive intrauterine device
        "267020005": _S,  # History of tubal ligation
        "165829005": _S,  # Gonorrhea infection titer test
        "310861008": _S,  # Chlamydia antigen test
    }
)

_NONE: Final[frozenset[str]] = frozenset()
_CLINICAL_ELEMENTS: Final = ("code", "category", "type", "reasonCode", "valueCodeableConcept", "conclusionCode")


def normalize_label(code: str) -> str | None:
    """The canonical label of a v3 ActCode sensitivity code (``"MH"`` → ``"PSY"``), or None."""
    return SECURITY_CODE_LABELS.get(code)


def icd10_labels(code: str) -> frozenset[str]:
    """Labels of an ICD-10 / ICD-10-CM code, by the ranges of the module docstring."""
    c = code.strip().upper().replace(".", "")
    if len(c) < 3:
        return _NONE
    letter, num = c[0], c[1:3]
    if letter == "O":
        return _HS if c.startswith("O987") else _S
    if not num.isdigit():
        return _NONE
    if letter == "F":
        return _PE if "10" <= num <= "19" else _P
    if letter == "B":
        return _H if "20" <= num <= "24" else _NONE
    if letter == "Z":
        if num == "21":
            return _H
        if "30" <= num <= "39":
            return _S
        if num in ("14", "15"):
            return _G
        return _NONE
    if letter == "R":
        return _H if num == "75" else _NONE
    if letter == "A":
        return _S if "50" <= num <= "64" else _NONE
    if letter == "N":
        return _S if num in ("46", "97") else _NONE
    if letter == "Q":
        return _G if "90" <= num <= "99" else _NONE
    return _NONE


def _coding_labels(coding: Mapping[str, Any]) -> Iterable[str]:
    system, code = coding.get("system"), coding.get("code")
    if not isinstance(system, str) or not isinstance(code, str):
        return _NONE
    if system in ICD10_SYSTEMS:
        return icd10_labels(code)
    if system == LOINC_SYSTEM:
        return LOINC_LABELS.get(code, _NONE)
    if system == SNOMED_SYSTEM:
        return SNOMED_LABELS.get(code, _NONE)
    if system == V2_0074_SYSTEM and code == "GE":
        return _G
    return _NONE


def _concepts(value: Any) -> Iterable[Mapping[str, Any]]:
    """The CodeableConcepts of an element that holds one or a list of them."""
    if isinstance(value, Mapping):
        return (value,)
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return ()


def classify(resource: Mapping[str, Any]) -> frozenset[str]:
    """The sensitivity labels of a FHIR resource (JSON as a dict), as a frozenset of label codes."""
    found: set[str] = set()
    meta = resource.get("meta")
    if isinstance(meta, Mapping):
        for coding in _concepts(meta.get("security")):
            if coding.get("system") == ACTCODE_SYSTEM:
                label = SECURITY_CODE_LABELS.get(coding.get("code"))  # type: ignore[arg-type]
                if label is not None:
                    found.add(label)
    for element in _CLINICAL_ELEMENTS:
        for concept in _concepts(resource.get(element)):
            codings = concept.get("coding")
            if isinstance(codings, list):
                for coding in codings:
                    if isinstance(coding, Mapping):
                        found.update(_coding_labels(coding))
    return frozenset(found) if found else _NONE
