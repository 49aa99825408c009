"""The pack's HTTP routes on ComfyUI's server, for the browser extension (``web/gie.js``).

Thin glue: each route of :data:`gie_core.engine.web_rules.ROUTES` answers ``GET`` with the JSON its
plain function returns. Registered only inside ComfyUI (outside it there is no server and
:func:`register` does nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gie_core.engine.web_rules import ROUTES, Answer

from . import comfy


def make_handler(answer: Callable[[Mapping[str, str]], Answer], json_response: Callable):
    """An aiohttp handler: the request's query string in, ``json_response(body, status=...)`` out."""

    async def handler(request):
        status, body = answer(request.rel_url.query)
        return json_response(body, status=status)

    handler.__name__ = f"gie_{answer.__name__}"
    return handler


def register() -> bool:
    """Add ``GET`` routes for :data:`ROUTES` to ComfyUI's server (ComfyUI also serves them under
    ``/api``, where the frontend's ``api.fetchApi`` asks). False outside ComfyUI."""
    server, web = comfy.prompt_server(), comfy.aiohttp_web()
    if server is None or web is None:
        return False
    for path, answer in ROUTES.items():
        server.routes.get(path)(make_handler(answer, web.json_response))
    return True
