"""Django: views reach the collector with ``after_response.current()``, async views and
sync ones (which Django runs in a worker thread) alike.

Django's ASGI handler does not speak lifespan (it raises on the lifespan scope); the
middleware answers lifespan for it, so side effects still get the background executor and
a drain at shutdown. Settings are configured here, in code: no project directory.
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.urls import path

from after_response import current

from . import Built, Probe, add_effect, chunks, wrapped

#: Django is configured once per process: views find the current test's probe here.
_probe: list[Probe] = []


async def effect(request: HttpRequest) -> HttpResponse:
    request_id = add_effect(current(), _probe[0], request.GET)
    return HttpResponse(f"queued {request_id}", content_type="text/plain")


async def stream(request: HttpRequest) -> StreamingHttpResponse:
    request_id = add_effect(current(), _probe[0], request.GET)
    return StreamingHttpResponse(chunks(request_id), content_type="text/plain")


async def fail(request: HttpRequest) -> HttpResponse:
    request_id = add_effect(current(), _probe[0], request.GET)
    return HttpResponse(f"failed {request_id}", status=500, content_type="text/plain")


async def raising(request: HttpRequest) -> HttpResponse:
    add_effect(current(), _probe[0], request.GET)
    raise RuntimeError("the handler failed after adding a side effect")


def collector(request: HttpRequest) -> HttpResponse:
    """A sync view: Django runs it in a worker thread, with the request's context."""
    request_id = int(request.GET["id"])
    _probe[0].collectors[request_id] = (current(), current())
    return HttpResponse(f"collector {request_id}", content_type="text/plain")


urlpatterns = [
    path("effect", effect),
    path("stream", stream),
    path("fail", fail),
    path("raise", raising),
    path("collector", collector),
]


def create_app(probe: Probe, **options: Any) -> Built:
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="after-response tests",
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["127.0.0.1"],
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            LOGGING_CONFIG=None,  # leave the test run's logging alone
        )
        django.setup()
    _probe[:] = [probe]
    return wrapped(get_asgi_application(), probe, app_lifespan=False, **options)
