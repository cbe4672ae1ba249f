"""Break-glass pages: the privacy officer's review list, and the patient's notification.

    GET  /console/break-glass         the claims made by members of the signed-in privacy officer's
                                      organization (an admin linked to it), newest first, active
                                      ones highlighted, each with its written reason; 303 to the
                                      sign-in page when signed out, a 403 page for anyone else
    POST /portal/break-glass/seen     the patient dismisses the notices: the portal's banner goes
                                      away until a new claim is made

``break_glass_banner(request, user)`` gives the portal home (``pages.portal``) every claim on the
signed-in patient they have not dismissed (kept with the claim,
``break_glass_claims.seen_by_patient``, so on every device); dismissed claims stay listed on the
consent page and in the access log.

Who may read what is ``policy.review_break_glass`` and ``ConsentService.break_glass_notices``;
reading the list is audited in ``ConsentService.break_glass_review``. This module only renders,
and never logs a reason (it may contain PHI).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from teleledger.core.errors import Forbidden, TeleledgerError
from teleledger.policy.model import Principal
from teleledger.web.deps import in_thread
from teleledger.web.ui.session import PagePrincipal, render

log = logging.getLogger("teleledger.web")
router = APIRouter(tags=["ui"])

PATH = "/console/break-glass"
SEEN_PATH = "/portal/break-glass/seen"


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _no_store_redirect(to: str) -> Response:
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store"})


@router.get(PATH, response_class=HTMLResponse)
async def review(request: Request, user: PagePrincipal) -> Response:
    if user is None:
        return _no_store_redirect(f"/login?next={PATH}")
    try:
        claims = await in_thread(request, request.app.state.node.consent_service.break_glass_review, user)
    except Forbidden as exc:
        return render(request, "forbidden.html", {"message": f"{exc.message} You are signed in as a {user.role}."},
                      status=403, user=user)
    rows = [{"claim_id": c.claim_id, "practitioner": c.practitioner, "practitioner_name": c.practitioner_name,
             "patient": c.patient, "started": _utc(c.started), "started_iso": _iso(c.started),
             "expires": _utc(c.expires), "expires_iso": _iso(c.expires), "active": c.active, "reason": c.reason}
            for c in claims]
    return render(request, "privacy_break_glass.html",
                  {"rows": rows, "active": sum(1 for r in rows if r["active"])}, user=user)


# ---- the patient's notification ---------------------------------------------------------------


def break_glass_banner(request: Request, user: Principal | None) -> list[dict]:
    """The claims on the signed-in patient not yet dismissed, for the portal's banner (none for
    anyone else: the service decides). A failure leaves the banner out, never the page (the
    claims stay on the consent page)."""
    if user is None:
        return []
    service = request.app.state.node.consent_service
    try:
        notices = service.break_glass_notices(user)
    except Forbidden:
        return []
    except (TeleledgerError, SQLAlchemyError) as exc:
        log.warning("break-glass notices unavailable: %s", type(exc).__name__)
        return []
    return [{"claim_id": n["claim_id"], "practitioner": n["practitioner_name"], "started": _utc(n["started"] / 1e6),
             "started_iso": _iso(n["started"] / 1e6), "expires": _utc(n["expires"] / 1e6),
             "latest": n["started"]} for n in notices]



@router.post(SEEN_PATH)
async def mark_seen(request: Request, user: PagePrincipal) -> Response:
    """Dismiss the notices shown. The form posts the newest start time it showed, so a claim
    made while the page was open is not dismissed with the others."""
    if user is None:
        return _no_store_redirect("/login?next=/portal")
    latest = str((await request.form()).get("latest", ""))[:20]
    try:
        await in_thread(request, request.app.state.node.consent_service.dismiss_break_glass_notices, user,
                        upto_us=int(latest) if latest.isdigit() else 0)
    except Forbidden as exc:
        return render(request, "forbidden.html", {"message": exc.message}, status=403, user=user)
    return _no_store_redirect("/portal")


__all__ = ["PATH", "break_glass_banner", "router"]
