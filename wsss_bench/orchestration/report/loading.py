"""Loading a run folder for the report: results, config, manifest, datasets."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import DataError, UserError
from ...evaluation.rows import migrate_results



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


@dataclass
class Run:
    """A finished run directory, its results, config and manifest."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "Run":
        """Read ``results.json`` (required), ``config.yaml`` and ``manifest.json`` (optional)."""
        results = _read_json(path / "results.json")
        if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
            raise UserError(f"{path / 'results.json'}: not a results file (no 'rows' list)")
        for n, row in enumerate(results["rows"]):
            missing = [k for k in ("split", "miou", "protocol", "per_class") if k not in row]
            if missing:
                raise UserError(f"{path / 'results.json'}: row {n} lacks {', '.join(missing)}")
        config: dict[str, Any] = {}
        if (path / "config.yaml").is_file():
            import yaml

            try:
                config = yaml.safe_load((path / "config.yaml").read_text()) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"{path / 'config.yaml'}: invalid YAML ({exc})") from None
        manifest = _read_json(path / "manifest.json") if (path / "manifest.json").is_file() else {}
        results = migrate_results(results)  # rows of runs written before stages existed
        return cls(path, results, config if isinstance(config, dict) else {},
                   manifest if isinstance(manifest, dict) else {})

    @property
    def rows(self) -> list[dict[str, Any]]:
        """All result rows."""
        return self.results["rows"]

    @property
    def final(self) -> list[dict[str, Any]]:
        """The rows of the final CAMs (``final`` in results.json, else the last row per split)."""
        final = self.results.get("final") or []
        if final:
            return final
        last: dict[str, dict[str, Any]] = {}
        for row in self.rows:
            last[row["split"]] = row
        return list(last.values())

    @property
    def class_names(self) -> list[str]:
        """Foreground class names (the per-class rows minus background)."""
        names = self.manifest.get("dataset", {}).get("class_names")
        if names:
            return list(names)
        return [c["class"] for c in self.rows[0]["per_class"][1:]] if self.rows else []

    def data_root(self, role: str) -> Path:
        """The VOC-layout root a split was read from (``role`` is ``train`` or ``eval:<split>``).

        The manifest's resolved root first; else the configuration is resolved again (e.g. a
        run copied from another machine: the synthetic dataset is regenerated in the cache).
        """
        entry = self.manifest.get("dataset", {}).get(role) or {}
        root = entry.get("root")
        if root and Path(root).is_dir():
            return Path(root)
        if not self.config:
            raise DataError(f"{self.path}: cannot find the dataset (no manifest.json or config.yaml)")
        from ...config import validate_config
        from ...data.open import resolve_data_root

        found, _ = resolve_data_root(validate_config(dict(self.config)))
        return Path(found)

    def open_eval_split(self, split: str) -> Any:
        """The evaluation split, with masks, as the run read it."""
        from ...data.voc import open_split

        labels = (self.config.get("dataset") or {}).get("labels_file")
        return open_split(self.data_root(f"eval:{split}"), split, Path(labels) if labels else None,
                          self.class_names or None)

    def train_ids(self) -> list[str]:
        """The training ids in the order of the sub-category arrays (first ``max_images``)."""
        from ...data.voc import read_split

        dataset_cfg = self.config.get("dataset") or {}
        entry = self.manifest.get("dataset", {}).get("train") or {}
        split = entry.get("split") or dataset_cfg.get("train_split") or self.results.get("train_split") or "train_aug"
        ids = read_split(self.data_root("train"), split)
        limit = entry.get("images") or dataset_cfg.get("max_images")
        return ids[:limit] if limit else ids
