"""An offline HTML template for `dvc plots show`: vega, vega-lite and vega-embed inlined (no CDN).

DVC's default template loads vega from a CDN, which renders blank without internet. `make plots` installs
the three packages from the npm registry into .cache/vega and calls this module to inline them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SCRIPTS = (
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)


def offline_template(node_modules: str | Path) -> str:
    """HTML with the vega scripts inlined and DVC's `{plot_divs}` placeholder."""
    node_modules = Path(node_modules)
    scripts = []
    for rel in SCRIPTS:
        path = node_modules / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; run `make plots` (npm install vega vega-lite vega-embed)"
            )
        # "</script" inside the inlined code would end the tag early.
        scripts.append("<script>" + path.read_text().replace("</script", "<\\/script") + "</script>")
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset='utf-8'>\n<title>fscs plots</title>\n"
        + "\n".join(scripts)
        + "\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--node-modules", default=".cache/vega/node_modules")
    parser.add_argument("--out", default=".cache/vega/offline_template.html")
    args = parser.parse_args()
    Path(args.out).write_text(offline_template(args.node_modules))
    print(f"offline dvc plots template -> {args.out}")


if __name__ == "__main__":
    main()
