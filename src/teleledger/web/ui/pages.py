"""Server-rendered pages: the landing page, the signed-in portal and the patient's access log.

The landing page shows no patient data. The access log ("who accessed my record") reads the
signed-in patient's access events through ``node.audit_events`` and so through the same policy
decision point as ``GET /fhir/AuditEvent``; this module only turns AuditEvents into table rows.
Every row carries the leaf hash of its log entry, and ``static/verify.js`` checks it in the
browser against the log's signed checkpoint, trusting nothing this page says.

    GET /                    landing page
    GET /portal              signed-in landing (303 to /login when signed out)
    GET /portal/access-log   the patient's access events (patients only; 403 page otherwise)
    GET /static/...          app.css, verify.js

``router`` also carries the sign-in routes (``session.router``) and the static files, so
including it is all an app needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from teleledger import __version__
from teleledger.core.errors import Forbidden
from teleledger.policy import decide as policy
from teleledger.records.audit_events import LEAF_HASH_URL
from teleledger.web.deps import NodeDep
from teleledger.web.ui import session
from teleledger.web.ui.privacy_pages import break_glass_banner
from teleledger.web.ui.session import PagePrincipal, render

ACCESS_LOG_SIZE = 200

#: http://terminology.hl7.org/CodeSystem/v3-ActReason, in words a patient understands
PURPOSES = {
    "TREAT": "treatment",
    "ETREAT": "emergency treatment",
    "HPAYMT": "payment",
    "HRESCH": "research",
    "HOPERAT": "healthcare operations",
    "PATRQT": "your own request",
    "BTG": "break the glass (emergency access)",
}
#: AuditEvent.subtype (http://hl7.org/fhir/restful-interaction and teleledger's own codes)
ACTIONS = {
    "read": "read", "vread": "read a past version", "history": "read the history", "search": "searched",
    "everything": "read the whole record", "export": "exported", "create": "created", "import": "imported",
    "update": "changed", "delete": "deleted", "ui": "viewed in the portal",
}

router = APIRouter(tags=["ui"])
router.include_router(session.router)
router.mount("/static", StaticFiles(directory=str(Path(__file__).parent / "static")), name="static")


@dataclass(frozen=True)
class AccessRow:
    """One access event as the patient reads it."""

    event_id: str
    recorded: str  # ISO 8601 instant, for <time datetime>
    recorded_text: str  # the same in UTC, shown until the browser localises it
    who: str
    role: str
    organization: str
    action: str
    what: str
    purpose_code: str
    purpose_label: str
    allowed: bool
    reason: str
    leaf_hash: str


def _who(agent: dict, patient_id: str | None) -> str:
    who = agent.get("who") or {}
    ref = who.get("reference")
    if ref:
        return "you" if patient_id and ref == f"Patient/{patient_id}" else ref
    ident = (who.get("identifier") or {}).get("value", "")
    if ident.startswith("client:"):
        return f"service {ident.removeprefix('client:')}"
    return f"account {ident}" if ident else "unknown"


def _organization(agents: list[dict]) -> str:
    # accounts are not linked to an organization yet; an Organization agent is shown when present
    for agent in agents:
        who = agent.get("who") or {}
        if str(who.get("reference", "")).startswith("Organization/"):
            return str(who.get("display") or who["reference"])
    return "—"


def _what(entities: list[dict]) -> str:
    """The kinds of record disclosed, e.g. ``Observation ×3, Patient`` (no ids: they mean nothing to a patient)."""
    kinds = Counter(str(e.get("what", {}).get("reference", "")).split("/", 1)[0] for e in entities
                    if (e.get("type") or {}).get("code") == "2")
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(kinds.items()) if k)


def _utc_text(instant: str) -> str:
    try:
        moment = datetime.fromisoformat(instant).astimezone(timezone.utc)
    except ValueError:
        return instant
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def access_rows(bundle: dict, patient_id: str | None) -> list[AccessRow]:
    rows = []
    for entry in bundle.get("entry", []):
        ev = entry["resource"]
        agents = ev.get("agent") or [{}]
        purpose = next((c.get("code", "") for p in ev.get("purposeOfEvent", []) for c in p.get("coding", [])), "")
        subtype = next((s.get("code", "") for s in ev.get("subtype", [])), "")
        leaf = next((x.get("valueBase64Binary", "") for x in ev.get("extension", []) if x.get("url") == LEAF_HASH_URL),
                    "")
        rows.append(AccessRow(
            event_id=ev["id"], recorded=ev["recorded"], recorded_text=_utc_text(ev["recorded"]),
            who=_who(agents[0], patient_id), role=next((r.get("text", "") for r in agents[0].get("role", [])), ""),
            organization=_organization(agents), action=ACTIONS.get(subtype, subtype or "unknown"),
            what=_what(ev.get("entity", [])), purpose_code=purpose,
            purpose_label=PURPOSES.get(purpose, "unrecognised purpose"),
            allowed=ev.get("outcome") == "0", reason=ev.get("outcomeDesc", ""), leaf_hash=leaf,
        ))
    return rows


def _to_login(next_page: str) -> Response:
    return RedirectResponse(f"/login?next={next_page}", status_code=303, headers={"Cache-Control": "no-store"})


@router.get("/", response_class=HTMLResponse)
def home(request: Request, node: NodeDep, user: PagePrincipal) -> HTMLResponse:
    s = node.settings
    return render(request, "home.html", {
        "version": __version__, "node_name": s.node_name, "base": s.public_url,
        "demo": s.demo_data and s.environment == "development",
    }, user=user)


@router.get("/portal", response_class=HTMLResponse)
def portal(request: Request, node: NodeDep, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal")
    return render(request, "portal.html", {"node_name": node.settings.node_name,
                                           "glass": break_glass_banner(request, user)}, user=user)


@router.get("/portal/access-log", response_class=HTMLResponse)
def access_log(request: Request, node: NodeDep, user: PagePrincipal) -> Response:
    if user is None:
        return _to_login("/portal/access-log")
    decision = policy.own_access_log(user)
    if not decision.allowed:
        return render(request, "forbidden.html", {"message": f"{decision.detail} You are signed in as a {user.role}."},
                      status=403, user=user)
    try:
        bundle = node.audit_events.search(user, [("_count", str(ACCESS_LOG_SIZE))])
    except Forbidden as exc:  # an account whose scopes leave out AuditEvent
        return render(request, "forbidden.html", {"message": exc.message}, status=403, user=user)
    rows = access_rows(bundle, user.patient_id)
    return render(request, "access_log.html", {"rows": rows, "total": bundle.get("total", len(rows)),
                                               "purposes": PURPOSES}, user=user)
