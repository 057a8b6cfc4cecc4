"""REST endpoints: translate HTTP to hibernator calls, nothing more.

``POST /api/kernels/{id}/hibernate`` and ``POST /api/kernels/{id}/wake``, with
the kernels API's own authorization.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_server.auth.decorator import authorized
from jupyter_server.services.kernels.handlers import KernelsAPIHandler, _kernel_id_regex
from tornado import web

from .hibernator import HibernationError, KernelHibernator


class _HibernationHandler(KernelsAPIHandler):
    @property
    def hibernator(self) -> KernelHibernator:
        return self.kernel_manager.hibernator

    def _body(self) -> dict[str, Any]:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as exc:
            raise web.HTTPError(400, f"the request body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object")
        return body

    def _reply(self, kernel_id: str) -> None:
        model = self.kernel_manager.kernel_model(kernel_id)
        self.finish(json.dumps(model, default=json_default))

    def _fail(self, exc: HibernationError) -> web.HTTPError:
        return web.HTTPError(exc.status, str(exc), reason=type(exc).__name__)


class HibernateHandler(_HibernationHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        body = self._body()
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise web.HTTPError(400, "'force' must be true or false")
        try:
            await self.hibernator.hibernate(kernel_id, str(body.get("engine", "")), force)
        except HibernationError as exc:
            raise self._fail(exc) from exc
        self._reply(kernel_id)


class WakeHandler(_HibernationHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        try:
            await self.hibernator.wake(kernel_id)
        except HibernationError as exc:
            raise self._fail(exc) from exc
        self._reply(kernel_id)


handlers = [
    (rf"/api/kernels/{_kernel_id_regex}/hibernate", HibernateHandler),
    (rf"/api/kernels/{_kernel_id_regex}/wake", WakeHandler),
]
