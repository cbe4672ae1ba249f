"""Server-rendered consent pages for patients (no JavaScript needed).

    GET  /portal/consents                 who can see what, until when; the grant form; break-glass notices
    POST /portal/consents                 grant: actor, data classes, labels to keep out, period
    POST /portal/consents/{id}/revoke     revoke a consent (recorded on chain, like a grant)
    POST /portal/consents/delegates       "People who can act for me": add (enabled=true) or remove
                                          (enabled=false) a RelatedPerson of the patient that an account
                                          signs in as (a parent, guardian or caregiver)
    GET  /portal/consents/for/{patient}   a delegate's view of the patient they act for: the same page,
    POST /portal/consents/for/{patient}   grant and revoke signed with the delegate's own key
    POST /portal/consents/for/{patient}/{id}/revoke

A delegate without a record of their own lands on the list of the patients they act for.

Every action goes through ``policy.service.ConsentService`` as the signed-in patient (policy and
audit there). A refused form is shown again with a message saying what is wrong; nothing is
half-written. Forms rely on the session cookie's ``SameSite=Strict`` against cross-site posts.
"""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from teleledger.core.errors import TeleledgerError
from teleledger.policy import decide as policy
from teleledger.policy.delegates import acts_for_someone
from teleledger.policy.model import Principal
from teleledger.policy.service import DATA_CLASSES, LABELS, build_consent
from teleledger.web.deps import in_thread
from teleledger.web.ui.session import PagePrincipal, render

router = APIRouter(tags=["ui"])
PATH = "/portal/consents"


def _when(seconds: int) -> str:
    if not seconds:
        return "no end"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _when_us(us: int) -> str:
    return _when(us // 1_000_000)


def _only_patient(request: Request, user: Principal | None) -> Response | None:
    if user is None:
        return RedirectResponse(f"/login?next={PATH}", status_code=303, headers={"Cache-Control": "no-store"})
    decision = policy.role_workspace(user, "patient")
    if not decision.allowed:
        return render(request, "forbidden.html", {"message": decision.detail}, status=403, user=user)
    return None


def _page(request: Request, user: Principal, *, error: str | None = None, done: str | None = None,
          status: int = 200, patient_id: str | None = None) -> Response:
    """The patient's own consent page, or (``patient_id``) an active delegate's view of that
    patient's (no break-glass notices and no delegates there: those stay the patient's)."""
    service = request.app.state.node.consent_service
    own = patient_id is None
    patient_id = user.patient_id if own else patient_id
    assert patient_id is not None
    grantees = service.grantees(user)
    names = {g.ref: g.name for g in grantees}
    consents = {c["id"]: c for c in (service.consents_of(user) if own else service.consents_for(user, patient_id))}
    rows = [{"consent_id": g.consent_id, "grantee": names.get(g.grantee_ref, g.grantee_ref),
             "from": _when(g.valid_from) if g.valid_from else "now", "until": _when(g.valid_until),
             "status": ("in force" if g.in_force else "waiting for the chain") if g.status == "granted" else "revoked",
             "what": _summary(consents.get(g.consent_id)), "active": g.status == "granted" and g.consent_id in consents}
            for g in service.grants_of(patient_id)]
    notices = [{**n, "started": _when_us(n["started"]), "expires": _when_us(n["expires"]),
                "practitioner": names.get(n["practitioner"], n["practitioner"])}
               for n in (service.claims_for_patient(patient_id) if own else [])]
    return render(request, "consent_portal.html", {
        "rows": rows, "notices": notices, "directory": sorted(names.items(), key=lambda kv: kv[1]),
        "grantee_groups": _grantee_groups(grantees),
        "classes": DATA_CLASSES, "labels": LABELS, "error": error, "done": done,
        **_delegation_context(service, user, patient_id, own)}, status=status, user=user)


_DELEGATE_STATUS = {("active", True): "can act for you", ("pending", True): "waiting for the chain",
                    ("pending", False): "removal waiting for the chain", ("removed", False): "removed"}


def _acting(service, user: Principal) -> list[dict]:  # type: ignore[no-untyped-def]
    """The patients this account acts for, as the page lists them (only active ones link)."""
    return [{"patient_id": r.patient.removeprefix("Patient/"), "name": r.display or r.patient, "status": r.status}
            for r in service.acting_for(user) if r.enabled]


def _delegation_context(service, user: Principal, patient_id: str, own: bool) -> dict:  # type: ignore[no-untyped-def]
    """What the page shows about delegation: on the patient's own page their delegates, whom
    they may add, and whom they act for themselves; on a delegate's view, whose page it is."""
    if not own:
        row = next((r for r in service.acting_for(user) if r.patient == f"Patient/{patient_id}"), None)
        return {"base": f"{PATH}/for/{patient_id}", "acting_for": (row.display if row and row.display else
                                                                    f"Patient/{patient_id}")}
    delegates = [{"ref": r.related_person, "name": r.display or r.related_person, "enabled": r.enabled,
                  "status": _DELEGATE_STATUS.get((r.status, r.enabled), r.status)} for r in service.delegates_of(user)]
    return {"base": PATH, "delegates": delegates, "delegate_choices": service.delegate_choices(user),
            "acting": _acting(service, user)}


def _delegate_home(request: Request, user: Principal, *, status: int = 200) -> Response:
    """A delegate without a record of their own: the patients they act for."""
    service = request.app.state.node.consent_service
    return render(request, "consent_acting_for.html", {"acting": _acting(service, user)}, status=status, user=user)


#: the grant form's groups of grantees, in this order (``Grantee.kind``)
_GROUPS = (("practitioner", "Practitioners"), ("clinic", "Clinics and hospitals"), ("pharmacy", "Pharmacies"),
           ("payer", "Payers (health insurance)"), ("research study", "Research studies"),
           ("organization", "Other organizations"))
_PURPOSE_WORDS = {"TREAT": "for your care", "HPAYMT": "for payment", "HRESCH": "for research"}


def _grantee_groups(grantees: list) -> list[tuple[str, list[dict]]]:
    """(group label, [{ref, text}]) for the grant form's ``<optgroup>``s: each option says who,
    what kind and what for, e.g. "Main Street Pharmacy (pharmacy, for your care)"."""
    groups = []
    for kind, label in _GROUPS:
        members = sorted((g for g in grantees if g.kind == kind), key=lambda g: g.name.lower())
        if members:
            groups.append((label, [{"ref": g.ref, "text": f"{g.name} ({g.label.lower()}, "
                                                          f"{_PURPOSE_WORDS.get(g.purpose, g.purpose)})"}
                                   for g in members]))
    return groups


def _summary(resource: dict | None) -> str:
    if not resource:
        return ""
    p = resource.get("provision") or {}
    classes = [c.get("code") for c in p.get("class") or []]
    excluded = [c.get("code") for e in p.get("provision") or [] for c in e.get("securityLabel") or []]
    what = ", ".join(classes) if classes else "all my data"
    return what + (f" except {', '.join(excluded)}" if excluded else "")


_DONE = {"granted": "Access granted. It is in force once the chain has recorded it.",
         "revoked": "Access revoked. It ends once the chain has recorded it.",
         "delegate-added": "Signed. They can act for you once the chain has recorded it.",
         "delegate-removed": "Signed. They can no longer act for you once the chain has recorded it."}


@router.get(PATH, response_class=HTMLResponse)
async def consents_page(request: Request, user: PagePrincipal, done: str = "") -> Response:
    if user is not None and user.patient_id is None and acts_for_someone(user).allowed:
        return await in_thread(request, _delegate_home, request, user)
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None
    return await in_thread(request, _page, request, user, done=_DONE.get(done))


@router.post(PATH, response_class=HTMLResponse)
async def grant(request: Request, user: PagePrincipal) -> Response:
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None and user.patient_id is not None
    form = await request.form()
    service = request.app.state.node.consent_service
    try:
        actor = str(form.get("actor", ""))[:200]
        # a payer's grant is for payment, a pharmacy's or a clinic's for care: the grantee's kind says
        purpose = await in_thread(request, service.grant_purpose, user, actor)
        resource = build_consent(user.patient_id, actor,
                                 [str(v)[:64] for v in form.getlist("class")][:20],
                                 [str(v)[:16] for v in form.getlist("exclude")][:10],
                                 str(form.get("start", ""))[:32] or None, str(form.get("end", ""))[:32] or None,
                                 purpose=purpose)
        await in_thread(request, service.grant, user, resource)
    except TeleledgerError as exc:
        status = exc.status if exc.status < 500 else 503
        return await in_thread(request, _page, request, user, error=exc.message, status=status)
    return RedirectResponse(f"{PATH}?done=granted", status_code=303, headers={"Cache-Control": "no-store"})


@router.post(PATH + "/{consent_id}/revoke", response_class=HTMLResponse)
async def revoke(consent_id: str, request: Request, user: PagePrincipal) -> Response:
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None
    try:
        await in_thread(request, request.app.state.node.consent_service.withdraw, user, consent_id[:64])
    except TeleledgerError as exc:
        status = exc.status if exc.status < 500 else 503
        return await in_thread(request, _page, request, user, error=exc.message, status=status)
    return RedirectResponse(f"{PATH}?done=revoked", status_code=303, headers={"Cache-Control": "no-store"})


# ---- delegates ------------------------------------------------------------------------------


@router.post(PATH + "/delegates", response_class=HTMLResponse)
async def set_delegate(request: Request, user: PagePrincipal) -> Response:
    """Add or remove one of the patient's people who can act for them."""
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None
    form = await request.form()
    enabled = str(form.get("enabled", "true")) != "false"
    try:
        await in_thread(request, request.app.state.node.consent_service.set_delegate, user,
                        str(form.get("relatedPerson", ""))[:200], enabled)
    except TeleledgerError as exc:
        status = exc.status if exc.status < 500 else 503
        return await in_thread(request, _page, request, user, error=exc.message, status=status)
    done = "delegate-added" if enabled else "delegate-removed"
    return RedirectResponse(f"{PATH}?done={done}", status_code=303, headers={"Cache-Control": "no-store"})


async def _acting_for(request: Request, user: Principal | None, patient_id: str) -> Response | None:
    """None when ``user`` may manage Patient ``patient_id``'s consents as their active delegate;
    otherwise the sign-in redirect or the refusal page."""
    if user is None:
        return RedirectResponse(f"/login?next={PATH}", status_code=303, headers={"Cache-Control": "no-store"})
    decision = await in_thread(request, request.app.state.node.consent_service.may_act_for, user, patient_id)
    if not decision.allowed or user.patient_id == patient_id:
        message = decision.detail if not decision.allowed else "This is your own record: open your own consent page."
        return render(request, "forbidden.html", {"message": message}, status=403, user=user)
    return None


@router.get(PATH + "/for/{patient_id}", response_class=HTMLResponse)
async def delegate_page(patient_id: str, request: Request, user: PagePrincipal, done: str = "") -> Response:
    refused = await _acting_for(request, user, patient_id[:64])
    if refused is not None:
        return refused
    assert user is not None
    return await in_thread(request, _page, request, user, done=_DONE.get(done), patient_id=patient_id[:64])


@router.post(PATH + "/for/{patient_id}", response_class=HTMLResponse)
async def delegate_grant(patient_id: str, request: Request, user: PagePrincipal) -> Response:
    """A delegate grants for the patient (signed with the delegate's key)."""
    patient_id = patient_id[:64]
    refused = await _acting_for(request, user, patient_id)
    if refused is not None:
        return refused
    assert user is not None
    form = await request.form()
    service = request.app.state.node.consent_service
    try:
        actor = str(form.get("actor", ""))[:200]
        purpose = await in_thread(request, service.grant_purpose, user, actor)
        resource = build_consent(patient_id, actor, [str(v)[:64] for v in form.getlist("class")][:20],
                                 [str(v)[:16] for v in form.getlist("exclude")][:10],
                                 str(form.get("start", ""))[:32] or None, str(form.get("end", ""))[:32] or None,
                                 purpose=purpose)
        await in_thread(request, service.grant, user, resource)
    except TeleledgerError as exc:
        status = exc.status if exc.status < 500 else 503
        return await in_thread(request, _page, request, user, error=exc.message, status=status, patient_id=patient_id)
    return RedirectResponse(f"{PATH}/for/{patient_id}?done=granted", status_code=303,
                            headers={"Cache-Control": "no-store"})


@router.post(PATH + "/for/{patient_id}/{consent_id}/revoke", response_class=HTMLResponse)
async def delegate_revoke(patient_id: str, consent_id: str, request: Request, user: PagePrincipal) -> Response:
    """A delegate revokes one of the patient's consents (signed with the delegate's key)."""
    patient_id = patient_id[:64]
    refused = await _acting_for(request, user, patient_id)
    if refused is not None:
        return refused
    assert user is not None
    try:
        await in_thread(request, request.app.state.node.consent_service.withdraw, user, consent_id[:64])
    except TeleledgerError as exc:
        status = exc.status if exc.status < 500 else 503
        return await in_thread(request, _page, request, user, error=exc.message, status=status, patient_id=patient_id)
    return RedirectResponse(f"{PATH}/for/{patient_id}?done=revoked", status_code=303,
                            headers={"Cache-Control": "no-store"})
