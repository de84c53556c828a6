"""Orchestration: what runs the core for a user (a run, a bench, a report).

``runner`` (``wsss run``: data, plugins, run folder), ``context`` (:class:`MethodContext`, the
steps a method composes), ``stage_cache`` (store, ``--force``, manifest records of each cached
stage), ``manifest``, ``runlock``, ``bench`` (matrices of runs and their statistics) and
``report`` (HTML pages).  The package root keeps the plugin contract and the core they use.
"""
