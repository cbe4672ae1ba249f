"""The admin chain explorer page: recent blocks, decoded transactions and events, checkpoint
anchors beside the log's checkpoints, and the outbox queue.

    GET /admin/chain   admins only (``policy.admin_console``): 303 to the sign-in page when
                       signed out, a 403 page for every other role; "chain disabled" when the
                       node runs without a chain

This module only renders: what to read is ``ledger.chain.explorer.overview``, who may see it
is ``policy.admin_console``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from teleledger.ledger.chain import explorer
from teleledger.policy import decide as policy
from teleledger.web.deps import NodeDep
from teleledger.web.ui.session import PagePrincipal, render

router = APIRouter(tags=["ui"])

PATH = "/admin/chain"


@router.get(PATH, response_class=HTMLResponse)
def chain_explorer(request: Request, node: NodeDep, user: PagePrincipal) -> Response:
    if user is None:
        return RedirectResponse(f"/login?next={PATH}", status_code=303, headers={"Cache-Control": "no-store"})
    decision = policy.admin_console(user)
    if not decision.allowed:
        return render(request, "forbidden.html", {"message": f"{decision.detail} You are signed in as a {user.role}."},
                      status=403, user=user)
    runtime = getattr(node, "chain", None)
    if runtime is None:
        return render(request, "explorer.html", {"view": None}, user=user)
    view = explorer.runtime_overview(runtime, log_origin=node.log.origin)
    return render(request, "explorer.html", {"view": view}, user=user)
