"""`/docs`: Swagger UI served from the installed `swagger-ui-bundle` package, never from a CDN.

Why: FastAPI's default page loads its JavaScript and CSS from cdn.jsdelivr.net and its favicon from
fastapi.tiangolo.com, so on a private network (where most ML platforms run) `/docs` stays blank. This is
FastAPI's documented self-hosting recipe: the default docs routes are turned off in `create_app`, this module
adds `/docs` (and Swagger UI's OAuth2 redirect page) rendered by FastAPI's own `get_swagger_ui_html`, with
every asset URL pointing at the package's files mounted under `ASSETS`. ReDoc is not offered: no kept package
ships it, and a page that only works online is worse than none.

Like `/openapi.json`, these pages need no API key; they show the API's shape, never data.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
ASSETS = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """Add `/docs` backed by local assets. `create_app` must pass ``docs_url=None, redoc_url=None``."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise RuntimeError("create the app with docs_url=None and redoc_url=None: /docs is installed here")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API reference",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui-assets")
