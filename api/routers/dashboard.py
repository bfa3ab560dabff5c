"""The dashboard: server-rendered page shells whose script reads and drives everything
through the public HTTP API with the key the user types (kept in the tab's sessionStorage).
The pages name no object of any project, so they need no key; the script's API calls do."""

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent.parent
STATIC_DIR = HERE / "static"
STATIC_PATH = "/static"
templates = Jinja2Templates(directory=HERE / "templates")

NAV = (
    ("/", "jobs", "Jobs"),
    ("/new", "new", "New job"),
    ("/files", "files", "Files"),
    ("/playground", "playground", "Playground"),
)
PAGES = {path: page for path, page, _ in NAV}
TITLES = {page: title for _, page, title in NAV} | {"job": "Job"}
# Scripts, styles and requests from this origin only; no inline script or style, no frames.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def _page(request: Request, page: str, job_id: str = "") -> HTMLResponse:
    root = request.scope.get("root_path", "")
    response = templates.TemplateResponse(
        request,
        "dashboard.html",
        {
            "page": page,
            "title": TITLES[page],
            "job_id": job_id,
            "nav": NAV,
            "root": root,
            "static": f"{root}{STATIC_PATH}",
        },
    )
    response.headers.update(SECURITY_HEADERS)
    return response


def _register(path: str, page: str) -> None:
    def show(request: Request) -> HTMLResponse:
        return _page(request, page)

    router.add_api_route(path, show, methods=["GET"], response_class=HTMLResponse)


for path, name in PAGES.items():
    _register(path, name)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    return _page(request, "job", job_id)


def is_dashboard_path(path: str) -> bool:
    """Whether a request is for a page shell or a static file (no key needed)."""
    return path in PAGES or path.startswith(("/jobs/", f"{STATIC_PATH}/"))
