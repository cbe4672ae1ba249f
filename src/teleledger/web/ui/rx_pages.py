"""Server-rendered e-prescription pages (no JavaScript needed).

    GET  /console/prescriptions/new?encounter=…   the practitioner's prescribing form
    POST /console/prescriptions/new               sign & issue; shows the token and its QR code
    POST /console/prescriptions/{id}/cancel       the prescriber cancels (chain first)
    GET  /pharmacy                                 the pharmacist's workspace: paste or scan a token
    POST /pharmacy/verify                          the verification panel (token + chain only)
    POST /pharmacy/dispense                        dispense; the result (or the chain's refusal)
    GET  /portal/prescriptions                     the patient's prescriptions, dispenses, tokens
    POST /portal/prescriptions/{id}/share          send a prescription to a chosen pharmacy

Every action goes through ``prescriptions.service`` as the signed-in person (policy and audit
there). Tokens travel in POST bodies, never in URLs (URLs end up in logs). A refused form is
shown again with what was typed and a message saying what is wrong; nothing is half-written.
Forms rely on the session cookie's ``SameSite=Strict`` against cross-site posts (``session``).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from teleledger.core.errors import InvalidInput, TeleledgerError
from teleledger.policy import decide as policy
from teleledger.policy.model import Principal
from teleledger.prescriptions import token as rxtoken
from teleledger.prescriptions.service import PrescriptionService, org_name
from teleledger.web.deps import in_thread
from teleledger.web.ui import session
from teleledger.web.ui.session import PagePrincipal, render

router = APIRouter(tags=["ui"])
session.templates.env.filters.setdefault("rx_org", org_name)

#: a short pick list of common RxNorm clinical drugs; anything else is typed as free text
COMMON_MEDICATIONS = (
    ("197361", "Amlodipine 5 MG Oral Tablet"),
    ("314076", "Lisinopril 10 MG Oral Tablet"),
    ("860975", "Metformin hydrochloride 500 MG 24HR Extended Release Oral Tablet"),
    ("617314", "Atorvastatin 10 MG Oral Tablet"),
    ("308182", "Amoxicillin 250 MG Oral Capsule"),
    ("198211", "Simvastatin 40 MG Oral Tablet"),
    ("310965", "Ibuprofen 200 MG Oral Tablet"),
)
_RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def _service(request: Request) -> PrescriptionService:
    return PrescriptionService.for_node(request.app.state.node)


def _to_login(path: str) -> Response:
    return RedirectResponse(f"/login?next={path}", status_code=303, headers={"Cache-Control": "no-store"})


def _status(exc: TeleledgerError) -> int:
    return exc.status if exc.status < 500 else 503


def _only(request: Request, user: Principal | None, role: str, path: str) -> Response | None:
    if user is None:
        return _to_login(path)
    decision = policy.role_workspace(user, role)
    if not decision.allowed:
        return render(request, "forbidden.html", {"message": decision.detail}, status=403, user=user)
    return None


# ------------------------------------------------------------------ prescribing


def _defaults(encounter: str) -> dict[str, Any]:
    return {"encounter": encounter, "medication_code": "", "medication_text": "", "dosage": "", "quantity": "30",
            "unit": "tablet", "refills": "0", "valid_until": (date.today() + timedelta(days=90)).isoformat(),
            "substitution": True}


def _prescribe_page(request: Request, user: Principal, values: dict, *, error: str | None = None,
                    status: int = 200, issued: Any = None) -> HTMLResponse:
    return render(request, "rx_prescribe.html", {"values": values, "error": error, "medications": COMMON_MEDICATIONS,
                                                 "issued": issued}, status=status, user=user)


@router.get("/console/prescriptions/new", response_class=HTMLResponse)
async def prescribe_form(request: Request, user: PagePrincipal, encounter: str = "") -> Response:
    refused = _only(request, user, "practitioner", "/console/prescriptions/new")
    if refused is not None:
        return refused
    assert user is not None
    return _prescribe_page(request, user, _defaults(encounter[:64]))


def _whole(text: str, what: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)  # the service says why a fraction is refused
        except ValueError:
            return what


@router.post("/console/prescriptions/new", response_class=HTMLResponse)
async def prescribe(request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "practitioner", "/console/prescriptions/new")
    if refused is not None:
        return refused
    assert user is not None
    form = await request.form()
    values = {k: str(form.get(k, "")).strip()[:500] for k in
              ("encounter", "medication_code", "medication_text", "dosage", "quantity", "unit", "refills",
               "valid_until")}
    values["substitution"] = form.get("substitution") == "yes"
    node = request.app.state.node
    try:
        encounter = await in_thread(request, node.records.read, user, "Encounter", values["encounter"]) \
            if values["encounter"] else None
        if encounter is None or not (encounter.body or {}).get("subject"):
            raise InvalidInput("open the prescribing form from a visit (an encounter with a patient)")
        display = dict(COMMON_MEDICATIONS).get(values["medication_code"])
        medication: dict = ({"coding": [{"system": _RXNORM, "code": values["medication_code"], "display": display}],
                             "text": display} if display else {"text": values["medication_text"]})
        request_body = {
            "resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "subject": encounter.body["subject"],
            "encounter": {"reference": f"Encounter/{encounter.res_id}"},
            "medicationCodeableConcept": medication,
            "dosageInstruction": [{"text": values["dosage"]}] if values["dosage"] else [],
            "dispenseRequest": {
                "quantity": {"value": _whole(values["quantity"], values["quantity"]), "unit": values["unit"] or "unit"},
                "numberOfRepeatsAllowed": _whole(values["refills"] or "0", values["refills"]),
                "validityPeriod": {"end": values["valid_until"]},
            },
            "substitution": {"allowedBoolean": values["substitution"]},
        }
        stored, token = await in_thread(request, _service(request).issue_with_records, user, request_body)
    except TeleledgerError as exc:
        return _prescribe_page(request, user, values, error=exc.message, status=_status(exc))
    issued = {"id": stored.res_id, "token": token, "qr": rxtoken.qr_svg(token), "resource": stored.body}
    return _prescribe_page(request, user, values, issued=issued, status=201)


@router.post("/console/prescriptions/{rx_id}/cancel", response_class=HTMLResponse)
async def cancel(rx_id: str, request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "practitioner", "/console/prescriptions/new")
    if refused is not None:
        return refused
    assert user is not None
    try:
        await in_thread(request, _service(request).cancel, user, rx_id[:64])
    except TeleledgerError as exc:
        return render(request, "forbidden.html", {"message": exc.message}, status=_status(exc), user=user)
    return render(request, "rx_cancelled.html", {"rx_id": rx_id[:64]}, user=user)


# ------------------------------------------------------------------ the pharmacy


def _pharmacy_page(request: Request, user: Principal, *, token: str = "", verification: Any = None,
                   error: str | None = None, done: Any = None, status: int = 200) -> HTMLResponse:
    return render(request, "rx_pharmacy.html", {"token": token, "v": verification, "error": error, "done": done,
                                                "pharmacy": None}, status=status, user=user)


@router.get("/pharmacy", response_class=HTMLResponse)
async def pharmacy(request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "pharmacist", "/pharmacy")
    if refused is not None:
        return refused
    assert user is not None
    return _pharmacy_page(request, user)


@router.post("/pharmacy/verify", response_class=HTMLResponse)
async def pharmacy_verify(request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "pharmacist", "/pharmacy")
    if refused is not None:
        return refused
    assert user is not None
    token = str((await request.form()).get("token", "")).strip()[:5000]
    try:
        v = await in_thread(request, _service(request).verify, token)
    except TeleledgerError as exc:
        return _pharmacy_page(request, user, token=token, error=exc.message, status=_status(exc))
    return _pharmacy_page(request, user, token=token, verification=v)


@router.post("/pharmacy/dispense", response_class=HTMLResponse)
async def pharmacy_dispense(request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "pharmacist", "/pharmacy")
    if refused is not None:
        return refused
    assert user is not None
    form = await request.form()
    token = str(form.get("token", "")).strip()[:5000]
    quantity = _whole(str(form.get("quantity", "")).strip()[:20], "not a number")
    service = _service(request)
    try:
        done = await in_thread(request, service.dispense, user, quantity, token=token)
    except TeleledgerError as exc:
        try:
            v = await in_thread(request, service.verify, token)
        except TeleledgerError:
            v = None
        return _pharmacy_page(request, user, token=token, verification=v, error=exc.message, status=_status(exc))
    v = await in_thread(request, service.verify, token)
    return _pharmacy_page(request, user, token=token, verification=v, done=done.body, status=201)


# ------------------------------------------------------------------ the patient


@router.get("/portal/prescriptions", response_class=HTMLResponse)
async def my_prescriptions(request: Request, user: PagePrincipal, done: str = "") -> Response:
    refused = _only(request, user, "patient", "/portal/prescriptions")
    if refused is not None:
        return refused
    assert user is not None
    service = _service(request)
    try:
        items = await in_thread(request, service.mine, user)
    except TeleledgerError as exc:
        return render(request, "forbidden.html", {"message": exc.message}, status=_status(exc), user=user)
    qr = {p.rx_id: rxtoken.qr_svg(p.token) for p in items}
    return render(request, "rx_portal.html", {"items": items, "qr": qr, "pharmacies": service.pharmacies(),
                                              "done": "Prescription sent to the pharmacy." if done == "shared" else None},
                  user=user)


@router.post("/portal/prescriptions/{rx_id}/share", response_class=HTMLResponse)
async def share(rx_id: str, request: Request, user: PagePrincipal) -> Response:
    refused = _only(request, user, "patient", "/portal/prescriptions")
    if refused is not None:
        return refused
    assert user is not None
    pharmacy_name = str((await request.form()).get("pharmacy", ""))[:200]
    try:
        await in_thread(request, _service(request).share, user, rx_id[:64], pharmacy_name)
    except TeleledgerError as exc:
        return render(request, "forbidden.html", {"message": exc.message}, status=_status(exc), user=user)
    return RedirectResponse("/portal/prescriptions?done=shared", status_code=303, headers={"Cache-Control": "no-store"})
