"""Start a project folder from a shipped example: its run config, the launchers and the sample data.

`copy_example("sample_tiny", dest)` writes `dest/configs/sample_tiny.yaml`, `dest/launchers/*` and
`dest/data/sample/*` from the files shipped with versatune_ds (versatune_ds.resources), keeping the
relative layout the example configs expect. Existing files are never overwritten unless `force` is set.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from versatune_ds.errors import UserError
from versatune_ds.resources import shipped_names, shipped_path


def example_names() -> list[str]:
    return shipped_names("configs", ".yaml")


def copy_example(name: str, dest: str | Path, *, force: bool = False) -> list[Path]:
    """Copy example `name` into `dest`; returns the files written. Refuses to overwrite without `force`."""
    names = example_names()
    if name not in names:
        raise UserError(f"--example: no example {name!r}; shipped examples: {', '.join(names) or 'none found'}")
    dest = Path(dest)
    sources: list[tuple[Path, Path]] = [(shipped_path(f"configs/{name}.yaml"), dest / "configs" / f"{name}.yaml")]
    for folder in ("launchers", "data/sample"):
        root = shipped_path(folder)
        sources += [(path, dest / folder / path.relative_to(root)) for path in sorted(root.rglob("*")) if path.is_file()]
    existing = [str(target) for _, target in sources if target.exists()]
    if existing and not force:
        raise UserError(
            f"init: {len(existing)} file(s) already exist in {dest} (e.g. {existing[0]}); choose an empty folder, "
            "or pass --force to overwrite them"
        )
    for source, target in sources:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return [target for _, target in sources]
