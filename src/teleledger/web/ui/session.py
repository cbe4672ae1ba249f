"""Browser sessions: sign in with a form, carry the access token in a cookie.

The cookie ``tl_session`` holds exactly the access token the token endpoint's password grant
would issue (same issuer, scopes, lifetime), so a page sees the same ``Principal`` and goes
through the same policy as the API. The cookie is ``HttpOnly`` (no script can read it),
``SameSite=Strict`` (no other site can make the browser send it: the CSRF defence for the
portal's forms) and ``Secure`` whenever the public URL is https.

The FHIR API never reads this cookie: ``web.deps.principal`` accepts only a Bearer header, so a
page session cannot be replayed against the API by a cross-site request.

    GET  /login    sign-in form
    POST /login    check the password, set the cookie, 303 to /portal
    POST /logout   clear the cookie, 303 to /

This module must never say whether a username exists.
"""

from __future__ import annotations

import re

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from teleledger.core.errors import Unauthenticated
from teleledger.policy.model import Principal
from teleledger.web.deps import NodeDep, request_purpose

COOKIE = "tl_session"
#: where a signed-in person may be sent back to after signing in (never an arbitrary URL)
#: where sign-in may send the browser next: a path of this app's own page areas, never another
#: host (``//evil`` or ``https://…`` do not match), so ``?next=`` cannot be an open redirect
NEXT_PAGE = re.compile(r"^/(portal|console|visits|admin|pharmacy)(/[A-Za-z0-9._~\-/]*)?(\?[A-Za-z0-9=&._~\-%]*)?$")
LOGIN_FAILED = "That username and password do not match an account. Check them and try again."

router = APIRouter(tags=["ui"])
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

#: for every server-rendered page: no inline script or style, nothing framed, nothing cached
PAGE_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page_principal(request: Request) -> Principal | None:
    """The signed-in person, or None: no cookie, an expired or tampered token all read as signed out."""
    token = request.cookies.get(COOKIE, "").strip()
    if not token:
        return None
    try:
        claims = request.app.state.node.verifier.verify(token)
    except Unauthenticated:
        return None
    # pages send no purpose header: the role's default, a patient's own request for patients
    return Principal.from_claims(claims, purpose=request_purpose(claims.role, portal=True))


PagePrincipal = Annotated[Principal | None, Depends(page_principal)]


def render(request: Request, template: str, context: dict, *, status: int = 200,
           user: Principal | None = None) -> HTMLResponse:
    """A page with the shared security headers; ``user`` drives the header's sign-in/out control."""
    return templates.TemplateResponse(request, template, {**context, "user": user}, status_code=status,
                                      headers=PAGE_HEADERS)


def _next_page(value: object) -> str:
    return value if isinstance(value, str) and len(value) < 512 and NEXT_PAGE.match(value) else "/portal"


def _login_page(request: Request, *, username: str = "", error: str = "", next_page: str = "/portal",
                status: int = 200) -> HTMLResponse:
    return render(request, "login.html", {"username": username, "error": error, "next": next_page}, status=status)


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, user: PagePrincipal) -> Response:
    next_page = _next_page(request.query_params.get("next"))
    if user is not None:
        return RedirectResponse(next_page, status_code=303)
    return _login_page(request, next_page=next_page)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, node: NodeDep) -> Response:
    form = await request.form()
    username, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    next_page = _next_page(form.get("next"))
    if not username or not password:
        return _login_page(request, username=username, next_page=next_page, status=400,
                           error="Enter your username and your password.")
    try:
        account = await run_in_threadpool(node.accounts.authenticate, username, password)
    except Unauthenticated:
        return _login_page(request, username=username, next_page=next_page, status=400, error=LOGIN_FAILED)
    # the same token the password grant of POST /auth/token issues
    issued = node.issuer.issue(account.id, account.role, node.accounts.role_scopes(account.role),
                               **account.token_links())
    response = RedirectResponse(next_page, status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(COOKIE, issued.access_token, max_age=issued.expires_in, path="/", httponly=True,
                        samesite="strict", secure=node.settings.public_url.startswith("https://"))
    return response


@router.post("/logout")
def logout(node: NodeDep) -> Response:
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=node.settings.public_url.startswith("https://"))
    return response


__all__ = ["COOKIE", "PagePrincipal", "page_principal", "render", "router", "templates"]
