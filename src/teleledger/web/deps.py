"""Request-scoped dependencies: the node, and the authenticated principal (``Ctx``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from teleledger.bootstrap import Node
from teleledger.core.errors import Unauthenticated
from teleledger.policy.model import Principal

PURPOSES = {"TREAT", "ETREAT", "HPAYMT", "HRESCH", "HOPERAT", "PATRQT", "BTG"}


def get_node(request: Request) -> Node:
    return request.app.state.node


def principal(request: Request) -> Principal:
    """Authenticate the bearer token; every FHIR route depends on this (deny by default)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("a Bearer access token is required (POST /auth/token)")
    node: Node = request.app.state.node
    claims = node.verifier.verify(token.strip())
    purpose = request.headers.get("x-purpose-of-use", "TREAT").upper()
    return Principal.from_claims(claims, purpose=purpose if purpose in PURPOSES else "TREAT")


NodeDep = Annotated[Node, Depends(get_node)]
Ctx = Annotated[Principal, Depends(principal)]
