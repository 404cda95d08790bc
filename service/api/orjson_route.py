"""A route class whose JSON request body is parsed by orjson (several times faster than the
standard library on the 2 MB prefetch of a CDS hook; measured in bench/cds.py). What orjson
refuses and the standard library reads (a byte order mark, UTF-16, NaN) is read as before; what
neither storage nor orjson can hold (a lone surrogate, an integer beyond 64 bits in such a body)
is a 4xx, never a 500. An integer beyond 64 bits in a body orjson reads arrives as a float.

A hook's prefetch is set aside unparsed (`RawPrefetch`, in `request.state.raw_prefetch`) when
the body is a JSON object whose one "prefetch" member is an object and whose other members
orjson reads: a call whose EHR sent these very bytes last time is answered without parsing
them (cdshooks/service.py); any other call parses them with the same parser (`read_json`), and
what it refuses is a 400 naming the prefetch, once the caller is authenticated."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from ..cdshooks.schemas import RawPrefetch
from ..config.runtime import gc_paused
from ..fhir.ingest import read_json

_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])  # the top level only: members as JSON text


def split_prefetch(body: bytes) -> tuple[dict[str, Any], RawPrefetch] | None:
    """(the body without its prefetch, parsed; the prefetch as sent), or None when the body is not
    a plain object with one object-valued "prefetch" member (then it is parsed whole, as ever)."""
    if body.count(b'"prefetch"') != 1:  # absent, or a key repeated (or the word in a value)
        return None
    try:
        members = _MEMBERS.decode(body)
    except (msgspec.DecodeError, RecursionError):  # a byte order mark, UTF-16, NaN, not an object,
        return None  # malformed; or nested deeper than msgspec goes on this stack (orjson: 1,023 levels)
    raw = members.pop("prefetch", None)
    if raw is None or bytes(memoryview(raw)[:1]) != b"{":
        return None
    try:
        rest = {key: orjson.loads(memoryview(value)) for key, value in members.items()}
    except orjson.JSONDecodeError:
        return None
    return rest, RawPrefetch(bytes(raw))


class OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            split = split_prefetch(body) if self.method == "POST" else None
            if split is not None:
                self._json, self.state.raw_prefetch = split
            else:
                # What orjson refuses and the standard library reads is read as before; its errors
                # are FastAPI's 4xx as before.
                self._json = read_json(body)
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
