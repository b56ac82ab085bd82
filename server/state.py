"""What routes need, hung on ``app.state.server`` (its own module: routes and app both import it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from server.catalog import ModelSpec, SamplerInfo
from server.client import EngineClient
from server.lifecycle import RequestManager
from server.metrics import Metrics
from server.schemas import ValidationContext
from server.settings import Settings


@dataclass
class ServerState:
    """What routes need, hung on ``app.state.server``."""

    settings: Settings
    metrics: Metrics
    engine: RequestManager | None = None  # once the models are loaded and the engine started
    ready: bool = False
    load_error: str | None = None
    models: dict[str, ModelSpec] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # model id -> why it did not load (not served)
    samplers: list[SamplerInfo] = field(default_factory=list)
    ctx: ValidationContext | None = None
    device: str = ""
    load_task: asyncio.Task | None = None
    client: EngineClient | None = None  # the first engine's transport, also while it loads
    clients: list[EngineClient] = field(default_factory=list)  # every engine's (killed at exit if loading)
