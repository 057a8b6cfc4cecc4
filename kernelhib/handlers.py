"""REST endpoints: translate HTTP to hibernator calls, nothing more.

``POST /api/kernels/{id}/hibernate``, ``POST /api/kernels/{id}/wake`` and
``POST /api/kernels/{id}/recompute``, with the kernels API's own authorization.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_server.auth.decorator import authorized
from jupyter_server.services.kernels.handlers import KernelsAPIHandler, _kernel_id_regex
from tornado import web

from .engines.base import ENGINE_CHOICES
from .hibernator import HibernationError, KernelHibernator, Reason

# A hibernate request holds two short fields: anything larger is not one.
MAX_BODY_BYTES = 1024


def _bad_request(message: str) -> web.HTTPError:
    return web.HTTPError(400, message, reason=Reason.BAD_REQUEST.value)


class _HibernationHandler(KernelsAPIHandler):
    # The fields a request body may hold; their values are checked by each handler.
    fields: tuple[str, ...] = ()

    @property
    def hibernator(self) -> KernelHibernator:
        return self.kernel_manager.hibernator

    def _body(self) -> dict[str, Any]:
        """The request's JSON object, checked before anything is done with it.

        Messages never quote the body: it can be arbitrarily large.
        """
        if not self.request.body:
            return {}
        if len(self.request.body) > MAX_BODY_BYTES:
            raise _bad_request(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.request.body)
        except ValueError as exc:
            raise _bad_request(f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        unknown = sorted(set(body) - set(self.fields))
        if unknown:
            allowed = ", ".join(self.fields) or "nothing"
            raise _bad_request(f"unknown field {unknown[0][:40]!r} (this request takes {allowed})")
        return body

    def _reply(self, kernel_id: str) -> None:
        model = self.kernel_manager.kernel_model(kernel_id)
        self.finish(json.dumps(model, default=json_default))

    def _fail(self, exc: HibernationError) -> web.HTTPError:
        return web.HTTPError(exc.status, str(exc), reason=exc.reason.value)


class HibernateHandler(_HibernationHandler):
    fields = ("engine", "force")

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        body = self._body()
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise _bad_request("'force' must be true or false")
        engine = body.get("engine", "")
        if not isinstance(engine, str) or engine.lower() not in ("", *ENGINE_CHOICES):
            raise _bad_request(f"'engine' must be one of {', '.join(ENGINE_CHOICES)}")
        try:
            await self.hibernator.hibernate(kernel_id, engine, force)
        except HibernationError as exc:
            raise self._fail(exc) from exc
        self._reply(kernel_id)


class WakeHandler(_HibernationHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self._body()
        try:
            await self.hibernator.wake(kernel_id)
        except HibernationError as exc:
            raise self._fail(exc) from exc
        self._reply(kernel_id)


class RecomputeHandler(_HibernationHandler):
    """Run the cells that re-create what the last dill wake lost (``recompute = offer``)."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        self._body()
        try:
            await self.hibernator.recompute_lost(kernel_id)
        except HibernationError as exc:
            raise self._fail(exc) from exc
        self._reply(kernel_id)


handlers = [
    (rf"/api/kernels/{_kernel_id_regex}/hibernate", HibernateHandler),
    (rf"/api/kernels/{_kernel_id_regex}/wake", WakeHandler),
    (rf"/api/kernels/{_kernel_id_regex}/recompute", RecomputeHandler),
]
