"""Hook specifications: the whole surface a wsss-bench plugin can implement.

A plugin is any module or object registered under the ``wsss_bench`` entry-point group whose
functions are decorated with :data:`wsss_bench.hookimpl`.  Registration hooks receive a
``register`` callback so the host owns naming, validation and duplicate detection (the
datasette/llm style); a plugin never returns lists the host would have to trust.

Every hook is keyword-only and a plugin may accept a subset of the arguments.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import click

PROJECT = "wsss_bench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The ``register`` callback (its full signature: :class:`wsss_bench.contracts.Register`).
Register = Callable[..., None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone factories.

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an ``nn.Module`` whose ``forward(x)`` gives the final feature map ``[N, C, h, w]``
    (the map CAMs are read from) and that exposes ``out_channels: int`` and ``stride: int``
    (:class:`wsss_bench.contracts.Backbone`; the host checks both, and the first output).
    Optional: ``load_pretrained(path)`` and ``feature_levels`` (name ->
    :class:`wsss_bench.contracts.FeatureLevel`) with ``forward_levels(x)`` returning those maps,
    for stages that read intermediate maps (AffinityNet).  ``options`` may be a
    pydantic model class used to validate the factory's keyword arguments.  The factory may
    expose ``options_from_state_dict(state_dict) -> dict | None``: the options that rebuild the
    architecture of a checkpoint's backbone tensors (keys as the module names them), or None
    when they are not its layout; inference from a file without recorded metadata asks every
    backbone (:mod:`wsss_bench.architecture`).  A backbone may also expose
    ``pretrained_source`` (a dict naming the weights file it loaded and its sha256), which the
    run manifest records.
    """


@hookspec
def register_clusterers(register: Register) -> None:
    """Register clustering algorithms.

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an object with ``fit_predict(features: np.ndarray[N, D], k: int, seed: int) ->
    np.ndarray[N]`` of integer labels in ``[0, k)`` (checked by the host).  Optional:
    ``fit_predict(..., metadata=None)`` receives a :class:`wsss_bench.clustering.ClusterMetadata`
    (image ids, the class, its declared true sub-types), and ``choose_k(metadata) -> int`` sets a
    class's K (see :mod:`wsss_bench.clustering`).
    """


@hookspec
def register_methods(register: Register) -> None:
    """Register CAM methods (the recipe selected by ``wsss run --method NAME``).

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an object with ``run(ctx: MethodContext) -> dict`` that trains what it needs, writes
    CAM files through the context and returns ``{"rows": [...], ...}``
    (:class:`wsss_bench.contracts.MethodOutcome`, checked by the host); see
    :class:`wsss_bench.contracts.MethodContext` and docs/plugin-guide.md.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets.

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an object with ``prepare(root: Path | None, cache_dir: Path) -> Path`` giving the
    root of a VOC-layout tree, and ``class_names: list[str] | None``.
    """


@hookspec
def register_refiners(register: Register) -> None:
    """Register refiners: CAMs in, pseudo masks out (dense CRF, AffinityNet random walk, ...).

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an object with ``refine(image: PIL.Image, cams: float [n, H, W], keys: int [n]) ->
    uint8 [H, W]``: 0 background, ``key + 1`` a class, 255 where the refiner is unsure
    (:class:`wsss_bench.contracts.Refiner`; the host checks every map).  Optional: ``to(device)``
    and ``protocol`` (a dict of what a refined row should state, e.g. ``{"crf": "absent"}``).

    A refiner that learns (AffinityNet) also has ``fit(dataset, cam_dir, out_file, device,
    show_progress) -> Path``: train on the training split's images and CAM files, save the state
    to ``out_file``, use it from then on; and ``load_fitted(path)``: use a file ``fit`` saved
    before (the run caches ``fit`` as the stage ``refine:fit`` and calls this on a reuse).
    ``needs_fit`` (bool, default true when ``fit`` exists) says whether ``fit`` must run: false
    when the options already name weights (PSA's released ``res38_aff.pth``).
    """


@hookspec
def register_launchers(register: Register) -> None:
    """Register launchers: what starts a bench's cells (local processes, SLURM jobs, Ray tasks).

    Call ``register(name, factory, help="one line", options=None)``.  ``factory(**options)``
    returns an object with ``start(work_dir)``, ``submit(job: CellJob) -> str`` (a job id),
    ``wait(job_ids, timeout) -> list[JobEnd]``, ``state(job_id) -> "active"|"ended"|"unknown"``,
    ``cancel(job_id)`` and ``close()`` (:class:`wsss_bench.contracts.Launcher`; the host checks
    all six).  A job is one command line (:class:`wsss_bench.launching.CellJob`); the launcher
    only runs it: the bench reads the cell's results, exit status and heartbeat from its folder.
    ``wsss bench FILE --launcher NAME`` selects it.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add sub-commands to the ``wsss`` command-line group, e.g. with ``@cli.command()``."""


def hook_names() -> list[str]:
    """Names of every hook defined in this module (used by documentation tests)."""
    return [name for name, value in globals().items() if hasattr(value, PROJECT + "_spec")]


__all__ = ["hookimpl", "hookspec", "hook_names", "Register", "Any"]
