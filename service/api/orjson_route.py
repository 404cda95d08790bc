"""A route class whose JSON request body is parsed by orjson (several times faster than the
standard library on the 2 MB prefetch of a CDS hook; measured in bench/cds.py). What orjson
refuses and the standard library reads (a byte order mark, UTF-16, NaN) is read as before; what
neither storage nor orjson can hold (a lone surrogate, an integer beyond 64 bits in such a body)
is a 4xx, never a 500. An integer beyond 64 bits in a body orjson reads arrives as a float."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from ..config.runtime import gc_paused


class OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                # What orjson refuses and the standard library reads (a byte order mark, UTF-16,
                # NaN) is read as before; its errors are FastAPI's 4xx as before.
                doc = json.loads(body)
                try:
                    orjson.dumps(doc)  # what storage could not keep: a lone surrogate, a huge integer
                except TypeError as exc:
                    raise json.JSONDecodeError(f"not storable as JSON: {exc}", "", 0) from None
                self._json = doc
        return self._json


class OrjsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_with_orjson(request: Request) -> Response:
            # The collector stays out of the whole call (config/runtime.py): a hook's prefetch is
            # tens of thousands of acyclic objects, freed by reference counting when it returns.
            # Measured (bench/cds.py set-up, known patient after 40 new ones): collector passes
            # took 4.7 ms a call on average and one full pass 29 ms; paused, none ran.
            with gc_paused():
                return await handler(OrjsonRequest(request.scope, request.receive))

        return parse_with_orjson
