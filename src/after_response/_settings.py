"""The middleware's options, checked once, with an error that names each mistake."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

from ._checks import check_int, check_seconds
from ._dead_letters import DeadLetterHook, check_hook
from ._engine import Engine
from ._options import Retry
from ._store import Store

#: What happens to a side effect that finds the queue full.
OVERFLOW_POLICIES: Final = ("shed", "backpressure", "spill")


@dataclass(frozen=True)
class Settings:
    """Every option of ``AfterResponseMiddleware`` (see its docstring)."""

    max_concurrency: int = 100
    max_pending: int = 10_000
    overflow: str = "shed"
    overflow_timeout: float | None = 5.0
    admission_timeout: float = 10.0
    exempt_paths: Collection[str] = ()
    task_timeout: float | None = 60.0
    retry: Retry | None = None
    shutdown_timeout: float | None = 20.0
    run_on_error: bool = False
    max_threads: int = 40
    on_dead_letter: DeadLetterHook | None = None
    state_key: str = "after_response"
    store: Any = None
    engine: Any = None
    tracer_provider: Any = None
    meter_provider: Any = None
    loop_block_threshold: float | None = 0.1
    log_interval: float = 5.0

    def __post_init__(self) -> None:
        _check_count("max_concurrency", self.max_concurrency, minimum=1)
        _check_count("max_pending", self.max_pending, minimum=0)
        _check_count("max_threads", self.max_threads, minimum=1)
        check_seconds("overflow_timeout", self.overflow_timeout)
        check_seconds("task_timeout", self.task_timeout)
        check_seconds("shutdown_timeout", self.shutdown_timeout)
        policies = ", ".join(map(repr, OVERFLOW_POLICIES))
        if not isinstance(self.overflow, str):
            raise TypeError(
                f"overflow must be one of {policies}, got {type(self.overflow).__name__}"
            )
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(
                f"overflow must be one of {policies}, got "
                f"{self.overflow!r}: 'shed' drops what does not fit (logged, counted), "
                "'backpressure' holds new requests until there is room, 'spill' writes it to "
                "the store"
            )
        if self.overflow == "spill" and self.store is None:
            raise TypeError(
                "overflow='spill' writes the side effects that find no room to the durable "
                "store, and there is none: pass store=SQLiteStore('after_response.sqlite3')"
            )
        if self.store is not None:
            _check_store(self.store)
        if self.engine is not None:
            _check_engine(self.engine, self.store)
        _check_provider("tracer_provider", self.tracer_provider, "get_tracer", "TracerProvider")
        _check_provider("meter_provider", self.meter_provider, "get_meter", "MeterProvider")
        if self.admission_timeout is None:
            raise TypeError(
                "admission_timeout must be a positive number of seconds, not None: a request "
                "held by backpressure is answered 503 after it, never held forever"
            )
        check_seconds("admission_timeout", self.admission_timeout, or_none=False)
        if isinstance(self.exempt_paths, str) or not all(
            isinstance(path, str) and path.startswith("/") for path in self.exempt_paths
        ):
            raise TypeError(
                f"exempt_paths must be a collection of paths starting with '/', got "
                f"{self.exempt_paths!r}; for example exempt_paths=('/health', '/ready')"
            )
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be a Retry(...) or None, got {self.retry!r}")
        if not isinstance(self.run_on_error, bool):
            raise TypeError(f"run_on_error must be True or False, got {self.run_on_error!r}")
        check_hook(self.on_dead_letter)
        check_seconds("loop_block_threshold", self.loop_block_threshold)
        check_log_interval(self.log_interval)
        if not isinstance(self.state_key, str) or not self.state_key:
            raise TypeError(f"state_key must be a non-empty string, got {self.state_key!r}")


def _check_store(store: object) -> None:
    if isinstance(store, Store):
        return
    hint = (
        ": the path alone is not a store, wrap it: store=SQLiteStore(path)"
        if isinstance(store, (str, os.PathLike))
        else '; for example store=SQLiteStore("after_response.sqlite3")'
    )
    raise TypeError(
        f"store must be a durable store such as SQLiteStore(path), got {type(store).__name__}{hint}"
    )


def _check_provider(what: str, provider: object, method: str, kind: str) -> None:
    # By capability, not by class: the SDK's provider, the API's no-op one and users' own
    # wrappers all work, and all of them have the one method the telemetry calls.
    if provider is None or callable(getattr(provider, method, None)):
        return
    raise TypeError(
        f"{what} must be an OpenTelemetry {kind} (from the OpenTelemetry SDK or API: an "
        f"object with {method}()), or None for the global one; got {type(provider).__name__}"
    )


def _check_engine(engine: object, store: object) -> None:
    if not isinstance(engine, Engine):
        raise TypeError(
            f"engine must be an engine adapter such as CeleryEngine(celery_app) or "
            f"TaskiqEngine(broker), got {type(engine).__name__}"
        )
    if store is None:
        raise TypeError(
            f"engine={type(engine).__name__}(...) needs a durable store: a durable side effect "
            "is written to the store's outbox before its response completes and published to "
            "the engine after it, so that neither a crash nor a broker outage loses it; pass "
            "store=SQLiteStore('after_response.sqlite3') too"
        )


def _check_count(what: str, value: object, *, minimum: int) -> None:
    if check_int(what, value, "an int") < minimum:
        raise ValueError(f"{what} must be at least {minimum}, got {value}")


def check_log_interval(value: object) -> None:
    """Raise a clear error unless ``value`` is a positive number of seconds (not ``None``:
    repeated lines are always aggregated)."""
    check_seconds("log_interval", value, or_none=False)
