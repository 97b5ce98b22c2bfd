"""The registry of edge modes: a route's `mode` names one of these. Adding a mode is one
module beside these (a `Mode` subclass, see `edge.mode`) and one line here; the config
schema lists the names (`config.edge.RouteConfig.mode`) and the settings only that mode reads.

Only the worker (and `blindfold check-config`, through `check_route`) use the registry; a mode
never imports the worker or another mode."""

from __future__ import annotations

from blindfold.config.edge import EdgeConfig, RouteConfig
from blindfold.edge.mode import Mode
from blindfold.edge.modes.blind import BlindMode
from blindfold.edge.modes.keyless import KeylessMode
from blindfold.edge.modes.passthrough import PassthroughMode
from blindfold.obs.metrics import MetricSpec

MODES: dict[str, type[Mode]] = {
    PassthroughMode.name: PassthroughMode,
    KeylessMode.name: KeylessMode,
    BlindMode.name: BlindMode,
}


def check_route(where: str, rc: RouteConfig, edge: EdgeConfig) -> None:
    """What `blindfold check-config` checks of a route beyond the schema: its mode's files."""
    MODES[rc.mode].check_config(where, rc, edge)


def metrics() -> list[MetricSpec]:
    """Every mode's metrics (the worker reports them to the master, which renders them)."""
    return [spec for mode in MODES.values() for spec in mode.metrics]
