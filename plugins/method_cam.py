"""The baseline CAM method: train a multi-label classifier, read CAMs off its head weights."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from wsss_bench.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from wsss_bench.contracts import MethodContext, MethodOutcome


class CamOptions(BaseModel):
    """The baseline has no options of its own: training and CAMs follow the run config."""

    model_config = ConfigDict(extra="forbid")


class BaselineCam:
    """Train (round 0), infer CAMs on every evaluation split, score them."""

    def run(self, ctx: MethodContext) -> MethodOutcome:
        model = ctx.new_classifier()
        ctx.train(model, "round0")
        rows = ctx.cams_and_scores(model, "round0", row={"round": 0, "final": True})
        return {"rows": rows}


@hookimpl
def register_methods(register: Any) -> None:
    register("cam", BaselineCam, help="Baseline CAM: multi-label classifier + class activation maps",
             options=CamOptions)
