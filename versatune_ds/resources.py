"""Files shipped with versatune_ds: DeepSpeed configs, example run configs, launchers, the sample data.

In a source checkout they live at the repository root (`ds_configs/`, `configs/`, `launchers/`,
`data/sample/`). A wheel carries copies under `versatune_ds/_shipped/` (setup.py's build step puts them
there), so an installed package finds them without the checkout. `shipped_path` looks in the wheel's copy
first, then in the checkout.
"""

from __future__ import annotations

from pathlib import Path

from versatune_ds.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
WHEEL_DIR = PACKAGE_DIR / "_shipped"
CHECKOUT_DIR = PACKAGE_DIR.parent
SHIPPED_FOLDERS = ("ds_configs", "configs", "launchers", "data/sample")


def shipped_path(relative: str) -> Path:
    """The shipped file or folder `relative` (e.g. `ds_configs/zero3.json`), from the wheel or the checkout."""
    for base in (WHEEL_DIR, CHECKOUT_DIR):
        candidate = base / relative
        if candidate.exists():
            return candidate
    raise UserError(
        f"{relative} is not shipped with this installation of versatune_ds (looked in {WHEEL_DIR} and {CHECKOUT_DIR}); "
        "reinstall the package or give a path to the file"
    )


def shipped_names(folder: str, suffix: str) -> list[str]:
    """Names (without `suffix`) of the shipped files in `folder`, e.g. the DeepSpeed configs."""
    try:
        directory = shipped_path(folder)
    except UserError:
        return []
    return sorted(p.name[: -len(suffix)] for p in directory.glob(f"*{suffix}"))
