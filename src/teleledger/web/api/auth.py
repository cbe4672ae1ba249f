"""OAuth 2.0 token endpoint and SMART discovery.

``POST /auth/token`` (RFC 6749 §4.3 password grant for people, §4.4 client credentials for
services) issues EdDSA-signed JWT access tokens carrying SMART App Launch v2 scopes, narrowed
to what the account's role allows. Errors follow RFC 6749 §5.2 (``{"error": ...}``), not
OperationOutcome: this endpoint speaks OAuth.
"""

from __future__ import annotations

import base64

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from teleledger.core.errors import InvalidInput, Unauthenticated
from teleledger.identity.tokens import jwks
from teleledger.web.deps import NodeDep

router = APIRouter()


def _oauth_error(status: int, error: str, description: str) -> Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="teleledger"'
    return Response(orjson.dumps({"error": error, "error_description": description}), status_code=status,
                    media_type="application/json", headers=headers)


def _basic(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, pw = base64.b64decode(value).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user, pw


@router.post("/auth/token")
async def token(request: Request, node: NodeDep) -> Response:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/x-www-form-urlencoded"):
        return _oauth_error(400, "invalid_request", "send the token request form-encoded (application/x-www-form-urlencoded)")
    form = await request.form()
    grant = str(form.get("grant_type", ""))
    requested = str(form.get("scope", "")).strip()
    try:
        if grant == "password":
            username, password = str(form.get("username", "")), str(form.get("password", ""))
            if not username or not password:
                return _oauth_error(400, "invalid_request", "username and password are required")
            account = await run_in_threadpool(node.accounts.authenticate, username, password)
            allowed = node.accounts.role_scopes(account.role)
            scopes = allowed.narrow(requested) if requested else allowed
            issued = node.issuer.issue(account.id, account.role, scopes, **account.token_links())
        elif grant == "client_credentials":
            creds = _basic(request) or (str(form.get("client_id", "")), str(form.get("client_secret", "")))
            if not creds[0] or not creds[1]:
                return _oauth_error(401, "invalid_client", "client_id and client_secret are required")
            client = await run_in_threadpool(node.accounts.authenticate_client, *creds)
            scopes = client.scopes.narrow(requested) if requested else client.scopes
            issued = node.issuer.issue(f"client:{client.client_id}", "service", scopes, patient=None, fhir_user=None,
                                       client_id=client.client_id)
        else:
            return _oauth_error(400, "unsupported_grant_type", "grant_type must be password or client_credentials")
    except Unauthenticated as exc:
        if grant == "client_credentials":
            return _oauth_error(401, "invalid_client", exc.message)
        return _oauth_error(400, "invalid_grant", exc.message)
    except InvalidInput as exc:
        return _oauth_error(400, "invalid_scope", exc.message)
    body = {"access_token": issued.access_token, "token_type": "Bearer", "expires_in": issued.expires_in,
            "scope": issued.scope}
    if issued.patient:
        body["patient"] = issued.patient
    return Response(orjson.dumps(body), media_type="application/json",
                    headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@router.get("/.well-known/smart-configuration")
async def smart_configuration(node: NodeDep) -> Response:
    """SMART App Launch v2 discovery (https://hl7.org/fhir/smart-app-launch/conformance.html)."""
    base = node.settings.public_url
    body = {
        "issuer": base,
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "token_endpoint": f"{base}/auth/token",
        "grant_types_supported": ["password", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "fhirUser", "patient/*.cruds", "user/*.cruds", "system/*.cruds"],
        "response_types_supported": ["token"],
        "capabilities": ["permission-v2", "permission-patient", "permission-user", "client-confidential-symmetric"],
        "code_challenge_methods_supported": [],
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/.well-known/jwks.json")
async def jwks_json(node: NodeDep) -> Response:
    return Response(orjson.dumps(jwks([node.node_key.public_key()])), media_type="application/json")


__all__ = ["router"]
