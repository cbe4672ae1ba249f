"""Server-rendered pages. The landing page shows no patient data; the patient portal and the
clinician console come with the virtual-visits work and will go through the same records
service (and so the same policy decision point) as the API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from teleledger import __version__
from teleledger.web.deps import NodeDep

router = APIRouter()
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, node: NodeDep) -> HTMLResponse:
    s = node.settings
    return templates.TemplateResponse(request, "home.html", {
        "version": __version__, "node_name": s.node_name, "base": s.public_url,
        "demo": s.demo_data and s.environment == "development",
    })
