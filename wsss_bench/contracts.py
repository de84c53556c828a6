"""The host-plugin boundary in code: what each plugin kind provides, and the checks of it.

Every component a plugin registers is created by the host (:mod:`wsss_bench.components`), and the
host checks what it gets back against the contract below.  A violation is a
:class:`~wsss_bench.errors.PluginError` that names the component, its plugin and the plugin's
distribution, so a user knows whom to tell; it never surfaces as an AttributeError or an
IndexError deep inside the pipeline.

The Protocols describe the contract for type checkers and authors; the ``check_*`` functions
enforce it at run time (cheaply: attributes at creation, the first output of a backbone, every
clusterer's labels, every method's result).  :mod:`wsss_bench.testing` runs the same checks, and
more expensive ones (determinism), over any registered component.

Registration is unchanged for third-party plugins: the ``wsss_bench`` entry-point group, the
``register(name, factory, help=..., options=...)`` callback of each ``register_*`` hook, and
``fit_predict(features, k, seed)``; everything added since is optional.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, TypedDict, runtime_checkable

import numpy as np

from .errors import PluginError

if TYPE_CHECKING:  # pragma: no cover - annotations only; this module stays torch-free
    import torch
    from pydantic import BaseModel

    from .clustering import ClusterMetadata
    from .launching import CellJob, JobEnd
    from .orchestration.context import MethodContext
    from .registry import Component

#: Attribute the host sets on the objects it creates, so later checks can name their origin.
COMPONENT_ATTR = "_wsss_component"


def __getattr__(name: str) -> Any:
    # MethodContext, the typed context a method's run(ctx) receives, is part of the contract;
    # its home (wsss_bench.orchestration.context) imports torch, so it loads on first use.
    if name == "MethodContext":
        from .orchestration.context import MethodContext

        return MethodContext
    raise AttributeError(f"module 'wsss_bench.contracts' has no attribute {name!r}")


class Register(Protocol):
    """The ``register`` callback every ``register_*`` hook receives."""

    def __call__(self, name: str, factory: Callable[..., Any], help: str = "",
                 options: Optional[type["BaseModel"]] = None) -> None:
        """Register ``factory`` under ``name``; ``factory(**options)`` builds the component.

        ``options`` (a pydantic model) validates the options before the factory sees them.
        """


@dataclass(frozen=True)
class FeatureLevel:
    """One intermediate feature map a backbone exposes (e.g. for AffinityNet)."""

    channels: int
    stride: int


@runtime_checkable
class Backbone(Protocol):
    """A backbone: an ``nn.Module`` whose ``forward(x)`` gives the final map ``[N, C, h, w]``.

    Required: ``out_channels`` (C) and ``stride`` (``h = ceil(H / stride)`` up to one pixel:
    CAM sizes depend on it).  Optional: ``feature_levels`` (name -> :class:`FeatureLevel`)
    with ``forward_levels(x)`` returning those maps by name (AffinityNet reads three of one
    stride), ``load_pretrained(path)``, ``pretrained_source`` (dict naming the weights it loaded) and, on
    the factory, ``options_from_state_dict(state_dict) -> dict | None``.
    """

    out_channels: int
    stride: int

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor": ...


@runtime_checkable
class Clusterer(Protocol):
    """``fit_predict(features [N, D], k, seed) -> int labels [N] in [0, k)``.

    Optional: a ``metadata`` keyword (:class:`wsss_bench.clustering.ClusterMetadata`) and
    ``choose_k(metadata) -> int``.
    """

    def fit_predict(self, features: np.ndarray, k: int, seed: int) -> np.ndarray: ...


class MethodOutcome(TypedDict, total=False):
    """What a method's ``run(ctx)`` returns: result ``rows`` (required; from
    :meth:`MethodContext.cams_and_scores`), and optionally ``extra``, ``tables``, ``summary``."""

    rows: list[dict[str, Any]]
    extra: dict[str, Any]
    tables: dict[str, Any]
    summary: dict[str, Any]


@runtime_checkable
class Refiner(Protocol):
    """``refine(image, cams [n, H, W], keys [n]) -> uint8 [H, W]``: 0 background, ``key + 1``
    a class, 255 unsure.  Optional: ``to(device)``, ``protocol`` (dict)."""

    def refine(self, image: Any, cams: np.ndarray, keys: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class CamMethod(Protocol):
    """A CAM method: ``run(ctx)`` trains what it needs through the context and returns rows."""

    def run(self, ctx: "MethodContext") -> MethodOutcome: ...


@runtime_checkable
class DatasetProvider(Protocol):
    """A dataset: ``prepare(root | None, cache_dir) -> Path`` of a VOC-layout tree; optional
    ``class_names``."""

    def prepare(self, root: Optional[Path], cache_dir: Path) -> Path: ...


@runtime_checkable
class Launcher(Protocol):
    """Starts bench cells somewhere (local processes, SLURM jobs, Ray tasks) and says when they end.

    A cell is a :class:`wsss_bench.launching.CellJob`: one complete command line.  The bench
    calls ``start(work_dir)`` once (a folder of the bench where the launcher may keep its own
    files), then ``submit(job) -> job_id`` per cell; ``wait(job_ids, timeout)`` returns the
    :class:`~wsss_bench.launching.JobEnd` of those that ended within ``timeout`` seconds
    (possibly none); ``state(job_id)`` is ``"active"`` (queued or running), ``"ended"`` or
    ``"unknown"`` for any id, also one submitted by an earlier bench process (a resumed bench
    asks it about cells whose heartbeat has not started); ``cancel(job_id)`` stops a job;
    ``close()`` ends the launcher's session (jobs still running keep running where the
    launcher allows it).  Optional: ``cell_threads(default) -> int | None``, the thread count a
    cell gets when the local rule (``cpu_count // jobs``) gives ``default``: a launcher whose
    options reserve CPUs per cell returns that number; ``jobs_outlive_driver = False`` for a
    launcher whose jobs end with the process that submitted them (Ray's tasks), so a resumed
    bench submits their cells again at once.

    A launcher never reads results: the bench reads each cell's ``exit.json`` and
    ``results.json`` from its folder.
    """

    def start(self, work_dir: Path) -> None: ...

    def submit(self, job: "CellJob") -> str: ...

    def wait(self, job_ids: Sequence[str], timeout: float) -> list["JobEnd"]: ...

    def state(self, job_id: str) -> str: ...

    def cancel(self, job_id: str) -> None: ...

    def close(self) -> None: ...


#: What a launcher object must have (:class:`Launcher`).
LAUNCHER_METHODS = ("start", "submit", "wait", "state", "cancel", "close")


# -- naming ---------------------------------------------------------------------------------------
def describe(component: Optional["Component"]) -> str:
    """``backbone 'x' (plugin 'p', distribution d 1.2)`` for error messages."""
    if component is None:
        return "a plugin component"
    origin = f"plugin {component.plugin!r}"
    if component.distribution:
        origin += f", distribution {component.distribution}"
    return f"{component.kind} {component.name!r} ({origin})"


def describe_object(obj: Any) -> str:
    """:func:`describe` of the component ``obj`` was created as, else its class name."""
    component = getattr(obj, COMPONENT_ATTR, None)
    return describe(component) if component is not None else f"{type(obj).__name__}"


def tag(obj: Any, component: "Component") -> Any:
    """Remember on ``obj`` which component made it (objects that refuse attributes stay as they are)."""
    try:
        object.__setattr__(obj, COMPONENT_ATTR, component)
    except (AttributeError, TypeError):
        pass
    return obj


def violation(component_or_obj: Any, what: str) -> PluginError:
    """The error for a broken contract, naming the component and where it comes from."""
    from .registry import Component

    name = describe(component_or_obj) if isinstance(component_or_obj, Component) else describe_object(component_or_obj)
    return PluginError(f"{name} broke its contract: {what}")


# -- checks ---------------------------------------------------------------------------------------
def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


#: The method each kind's objects must have, with the signature its error names.
REQUIRED_METHOD = {
    "method": ("run", "the method object has no run(ctx)"),
    "clusterer": ("fit_predict", "the clusterer has no fit_predict(features, k, seed)"),
    "dataset": ("prepare", "the dataset has no prepare(root, cache_dir)"),
    "refiner": ("refine", "the refiner has no refine(image, cams, keys)"),
}


def check_created(made: Any, component: "Component") -> Any:
    """What a factory returned, checked against its kind's contract and tagged with its origin."""
    if component.kind == "backbone":
        return check_backbone(made, component)
    if component.kind == "launcher":
        missing = [m for m in LAUNCHER_METHODS if not callable(getattr(made, m, None))]
        if missing:
            raise violation(component, f"the launcher has no {', '.join(f'{m}()' for m in missing)} "
                                       "(see wsss_bench.contracts.Launcher)")
    required = REQUIRED_METHOD.get(component.kind)
    if required is not None and not callable(getattr(made, required[0], None)):
        raise violation(component, required[1])
    return tag(made, component)


def check_backbone(backbone: Any, component: "Component") -> Any:
    """Check a freshly built backbone's attributes; arm a check of its first output."""
    for attr in ("out_channels", "stride"):
        if not _positive_int(getattr(backbone, attr, None)):
            raise violation(component, f"the backbone has no positive integer `{attr}` "
                                       f"(got {getattr(backbone, attr, 'nothing')!r})")
    levels = getattr(backbone, "feature_levels", None)
    if levels is not None:
        if not isinstance(levels, dict) or not all(
                isinstance(k, str) and isinstance(v, FeatureLevel) and _positive_int(v.channels)
                and _positive_int(v.stride) for k, v in levels.items()):
            raise violation(component, "`feature_levels` must map names to FeatureLevel(channels, stride)")
        if not callable(getattr(backbone, "forward_levels", None)):
            raise violation(component, "the backbone declares `feature_levels` but no forward_levels(x)")
    tag(backbone, component)
    register_hook = getattr(backbone, "register_forward_hook", None)
    if register_hook is not None:
        handle = None

        def first_output(module: Any, inputs: tuple, output: Any) -> None:
            handle.remove()  # once: the check costs nothing after the first batch
            check_backbone_output(module, inputs[0] if inputs else None, output, component)

        handle = register_hook(first_output)
    return backbone


def check_backbone_output(backbone: Any, x: Any, out: Any, component: Optional["Component"] = None,
                          finite: bool = False) -> None:
    """The final map: a float ``[N, out_channels, ~H/stride, ~W/stride]`` tensor (``finite``: and
    no NaN or Inf, which only says something about freshly built weights, not loaded ones)."""
    import torch

    who = component if component is not None else backbone
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise violation(who, f"forward() must return a float tensor [N, C, h, w], got {shape}")
    if out.shape[1] != backbone.out_channels:
        raise violation(who, f"forward() gave {out.shape[1]} channels but out_channels is {backbone.out_channels}")
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        for axis, size in ((2, x.shape[2]), (3, x.shape[3])):
            expected = math.ceil(size / backbone.stride)
            if abs(out.shape[axis] - expected) > 1:
                raise violation(who, f"input {tuple(x.shape[2:])} gave a {tuple(out.shape[2:])} map; "
                                     f"stride {backbone.stride} means about {expected} along axis {axis}")
    if finite and not bool(torch.isfinite(out).all()):
        raise violation(who, "forward() returned NaN or infinite values")


def check_labels(clusterer: Any, labels: Any, n: int, k: int) -> np.ndarray:
    """A clusterer's labels: integers, shape ``[n]``, values in ``[0, k)``; returned as int64."""
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise violation(clusterer, f"fit_predict returned labels of shape {labels.shape} for {n} images")
    if labels.dtype.kind not in "iu":
        raise violation(clusterer, f"fit_predict returned {labels.dtype} labels; expected integers")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise violation(clusterer, f"labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def check_chosen_k(clusterer: Any, chosen: Any, metadata: "ClusterMetadata") -> int:
    """A clusterer's ``choose_k`` answer: a positive integer."""
    if not _positive_int(chosen):
        raise violation(clusterer, f"choose_k returned {chosen!r} for class {metadata['class_name']!r}; "
                                   "expected a positive integer")
    return int(chosen)


def check_method_outcome(outcome: Any, component: "Component") -> MethodOutcome:
    """A method's result: a dict whose ``rows`` is a non-empty list of scored rows."""
    if not isinstance(outcome, dict):
        raise violation(component, f"run() must return a dict with 'rows', got {type(outcome).__name__}")
    rows = outcome.get("rows")
    if not isinstance(rows, list) or not rows:
        raise violation(component, "run() must return {'rows': [...]} with at least one result row "
                                   "(from ctx.cams_and_scores)")
    for row in rows:
        missing = [k for k in ("split", "miou", "protocol") if not isinstance(row, dict) or k not in row]
        if missing:
            raise violation(component, f"result row without {missing} (rows come from ctx.cams_and_scores)")
    for key in ("extra", "tables", "summary"):
        if key in outcome and not isinstance(outcome[key], dict):
            raise violation(component, f"run()'s {key!r} must be a dict")
    return outcome  # type: ignore[return-value]


def check_job_ends(launcher: Any, ends: Any, submitted: Sequence[str]) -> list["JobEnd"]:
    """A launcher's ``wait`` answer: a list of :class:`JobEnd` for ids it was asked about."""
    from .launching import JobEnd

    if not isinstance(ends, (list, tuple)) or not all(isinstance(e, JobEnd) for e in ends):
        raise violation(launcher, f"wait() must return a list of JobEnd, got {type(ends).__name__}")
    asked = set(submitted)
    strange = [e.job_id for e in ends if e.job_id not in asked]
    if strange:
        raise violation(launcher, f"wait() reported job ids it was not asked about: {strange}")
    return list(ends)


def check_job_id(launcher: Any, job_id: Any) -> str:
    """A launcher's ``submit`` answer: a non-empty string."""
    if not isinstance(job_id, str) or not job_id:
        raise violation(launcher, f"submit() must return a non-empty job id string, got {job_id!r}")
    return job_id


def check_prepared_root(root: Any, component: "Component") -> Path:
    """A dataset's ``prepare`` result: an existing folder."""
    if not isinstance(root, (str, Path)) or not Path(root).is_dir():
        raise violation(component, f"prepare() must return the path of a folder, got {root!r}")
    return Path(root)


def check_refiner_output(labels: Any, size: tuple[int, int], keys: np.ndarray, num_classes: int,
                         component: Any) -> np.ndarray:
    """A refiner's label map: uint8 ``[H, W]`` (``size``) holding 0, the image's classes
    (``keys + 1``) and 255 only; else one error naming the refiner."""
    if not isinstance(labels, np.ndarray) or labels.dtype != np.uint8 or labels.ndim != 2:
        got = f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {tuple(getattr(labels, 'shape', ()))}"
        raise violation(component, f"refine() must return a uint8 [H, W] array, got {got}")
    if tuple(labels.shape) != tuple(size):
        raise violation(component, f"refine() returned a {labels.shape[1]}x{labels.shape[0]} map for a "
                                   f"{size[1]}x{size[0]} image")
    allowed = np.zeros(256, bool)
    allowed[[0, 255, *(np.asarray(keys, np.int64) + 1)]] = True
    found = np.unique(labels)
    bad = found[~allowed[found]]
    if bad.size:
        hint = f" (classes 1..{num_classes})" if int(bad.max()) > num_classes else " (absent from the image's labels)"
        raise violation(component, f"refine() labelled pixels {bad.tolist()}{hint}; allowed: 0, "
                                   f"{sorted((np.asarray(keys) + 1).tolist())} and 255")
    return labels
