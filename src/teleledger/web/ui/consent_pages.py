"""Server-rendered consent pages for patients (no JavaScript needed).

    GET  /portal/consents                 who can see what, until when; the grant form; break-glass notices
    POST /portal/consents                 grant: actor, data classes, labels to keep out, period
    POST /portal/consents/{id}/revoke     revoke a consent (recorded on chain, like a grant)

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
          status: int = 200) -> Response:
    service = request.app.state.node.consent_service
    assert user.patient_id is not None
    names = dict(service.directory(user))
    consents = {c["id"]: c for c in service.consents_of(user)}
    rows = [{"consent_id": g.consent_id, "grantee": names.get(g.grantee_ref, g.grantee_ref),
             "from": _when(g.valid_from) if g.valid_from else "now", "until": _when(g.valid_until),
             "status": ("in force" if g.in_force else "waiting for the chain") if g.status == "granted" else "revoked",
             "what": _summary(consents.get(g.consent_id)), "active": g.status == "granted" and g.consent_id in consents}
            for g in service.grants_of(user.patient_id)]
    notices = [{**n, "started": _when_us(n["started"]), "expires": _when_us(n["expires"]),
                "practitioner": names.get(n["practitioner"], n["practitioner"])}
               for n in service.claims_for_patient(user.patient_id)]
    return render(request, "consent_portal.html", {
        "rows": rows, "notices": notices, "directory": sorted(names.items(), key=lambda kv: kv[1]),
        "classes": DATA_CLASSES, "labels": LABELS, "error": error, "done": done}, status=status, user=user)


def _summary(resource: dict | None) -> str:
    if not resource:
        return ""
    p = resource.get("provision") or {}
    classes = [c.get("code") for c in p.get("class") or []]
    excluded = [c.get("code") for e in p.get("provision") or [] for c in e.get("securityLabel") or []]
    what = ", ".join(classes) if classes else "all my data"
    return what + (f" except {', '.join(excluded)}" if excluded else "")


@router.get(PATH, response_class=HTMLResponse)
async def consents_page(request: Request, user: PagePrincipal, done: str = "") -> Response:
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None
    message = {"granted": "Access granted. It is in force once the chain has recorded it.",
               "revoked": "Access revoked. It ends once the chain has recorded it."}.get(done)
    return await in_thread(request, _page, request, user, done=message)


@router.post(PATH, response_class=HTMLResponse)
async def grant(request: Request, user: PagePrincipal) -> Response:
    refused = _only_patient(request, user)
    if refused is not None:
        return refused
    assert user is not None and user.patient_id is not None
    form = await request.form()
    service = request.app.state.node.consent_service
    try:
        resource = build_consent(user.patient_id, str(form.get("actor", ""))[:200],
                                 [str(v)[:64] for v in form.getlist("class")][:20],
                                 [str(v)[:16] for v in form.getlist("exclude")][:10],
                                 str(form.get("start", ""))[:32] or None, str(form.get("end", ""))[:32] or None)
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
