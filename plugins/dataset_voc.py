"""PASCAL VOC 2012 (+ SBD ``SegmentationClassAug``) read from a user-supplied root."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from wsss_bench.data.voc import VOC_CLASSES, check_root
from wsss_bench.errors import ConfigError
from wsss_bench.hookspecs import hookimpl


class VocOptions(BaseModel):
    """No options: the layout is VOC's own."""

    model_config = ConfigDict(extra="forbid")


class VocDataset:
    """The tree at ``root`` as it is; VOC's 20 class names unless ``class_names.txt`` exists."""

    class_names = list(VOC_CLASSES)

    def prepare(self, root: Optional[Path], cache_dir: Path) -> Path:
        if root is None:
            raise ConfigError("dataset 'voc' needs --data-root /path/to/VOC2012 (it cannot be "
                              "downloaded by the toolkit)")
        root = check_root(Path(root))
        if (root / "class_names.txt").is_file():
            self.class_names = None  # type: ignore[assignment]  # read from the tree instead
        return root


@hookimpl
def register_datasets(register: Any) -> None:
    register("voc", VocDataset, help="PASCAL VOC 2012 (+SBD aug masks) at --data-root",
             options=VocOptions)
