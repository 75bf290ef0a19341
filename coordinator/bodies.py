"""Reading a JSON request body, with the coordinator's typed refusal (400)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from .errors import BadRequest


async def json_object(request: Request, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object; `{}` for an empty body when `empty_ok`.

    Raises:
        BadRequest: not JSON, or not an object.
    """
    if empty_ok and not await request.body():
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
