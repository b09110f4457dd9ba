"""Where the console's templates and its npm-installed htmx live, found once at start.

Templates are the top-level ``templates/`` folder of the sipwire checkout;
htmx comes from the npm package ``htmx.org`` pinned in ``package.json`` and
installed into ``node_modules/`` by ``npm ci`` (never from a CDN, never
copied into the source tree). Both are looked up beside the ``console``
package first (a checkout or an editable install), then in the current
directory. When htmx is missing the console refuses to start with a
sentence saying to run ``npm ci``, rather than serving pages that never
update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sipwire.errors import ConfigurationError

HTMX_DIST: Final = Path("node_modules") / "htmx.org" / "dist"
HTMX_FILE: Final = "htmx.min.js"


class AssetsMissingError(ConfigurationError):
    """Templates or htmx are not where the console looks; the message says what to run."""


@dataclass(frozen=True, slots=True)
class Assets:
    root: Path
    templates: Path
    htmx_dist: Path


def find_assets(root: Path | None = None) -> Assets:
    candidates = [root] if root is not None else [Path(__file__).resolve().parent.parent, Path.cwd()]
    for candidate in candidates:
        if (candidate / "templates" / "base.html").is_file():
            htmx = candidate / HTMX_DIST
            if not (htmx / HTMX_FILE).is_file():
                raise AssetsMissingError(
                    f"htmx is not installed: {htmx / HTMX_FILE} is missing; run `npm ci` in {candidate} "
                    "(the console serves htmx from node_modules, never from a CDN)"
                )
            return Assets(candidate, candidate / "templates", htmx)
    looked = ", ".join(str(c / "templates") for c in candidates)
    raise AssetsMissingError(
        f"console templates not found (looked in {looked}); run the console from a sipwire checkout "
        "or install it with `pip install -e .`"
    )
