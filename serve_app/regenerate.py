"""Rewrite the generated blocks of the deployment files from their Python source.

The Serve environment (`serve_app/serve_env.py`, SERVE_ENV), the embedding
tier's autoscaling block (`serve_app/autoscaling.py`) and its model worker's
environment (`serve_app/placement.py`, MODEL_WORKER_ENV) are defined once, in
Python, where the code imports them. The files that cannot import them (the
Dockerfile, the Serve configs in cluster/, the KubeRay manifest that embeds
one) carry copies between marker lines:

    # >>> generated: NAME (python -m serve_app.regenerate) >>>
    ...
    # <<< generated: NAME <<<

Run `python -m serve_app.regenerate` after changing a source; `--check`
only reports stale files (tests/unit/test_regenerate.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python -m serve_app.regenerate"
BEGIN = re.compile(r"^(?P<indent> *)# >>> generated: (?P<name>[\w-]+) .*>>>$")
END = "# <<< generated: {name} <<<"

# Which generated blocks each file holds, in the order they are rendered
# (the KubeRay manifest embeds serve-cluster.yaml once that is rendered).
FILES: dict[str, tuple[str, ...]] = {
    "Dockerfile": ("serve-env",),
    "cluster/serve.yaml": ("embed-autoscaling", "model-worker-env"),
    "cluster/serve-cluster.yaml": ("embed-autoscaling-cluster", "model-worker-env"),
    "cluster/kuberay-rayservice.yaml": ("serve-cluster-config",),
}


def _yaml(data: dict) -> list[str]:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).splitlines()


def _dockerfile_env() -> list[str]:
    """One ENV instruction with SERVE_ENV, for `ray start` in the image
    (Ray reads them when its processes start)."""
    from serve_app.serve_env import SERVE_ENV

    items = [f"{key}={value}" for key, value in SERVE_ENV.items()]
    lines = [f"    {item} \\" for item in items]
    lines[0] = "ENV " + lines[0].lstrip()
    lines[-1] = lines[-1].removesuffix(" \\")
    return lines


def _serve_cluster_config(root: Path) -> list[str]:
    """serveConfigV2: cluster/serve-cluster.yaml verbatim (rendered first)."""
    text = (root / "cluster" / "serve-cluster.yaml").read_text()
    return ["serveConfigV2: |"] + [
        f"  {line}" if line else "" for line in text.splitlines()
    ]


def blocks(root: Path = ROOT) -> dict[str, Callable[[], list[str]]]:
    """Each block's lines, unindented, by name."""
    from serve_app.autoscaling import EMBED_AUTOSCALING, EMBED_AUTOSCALING_CLUSTER
    from serve_app.placement import MODEL_WORKER_ENV

    return {
        "serve-env": _dockerfile_env,
        "embed-autoscaling": lambda: _yaml(EMBED_AUTOSCALING),
        "embed-autoscaling-cluster": lambda: _yaml(EMBED_AUTOSCALING_CLUSTER),
        "model-worker-env": lambda: _yaml(MODEL_WORKER_ENV),
        "serve-cluster-config": lambda: _serve_cluster_config(root),
    }


def render(text: str, names: tuple[str, ...], root: Path = ROOT) -> str:
    """`text` with the content of each generated block replaced; ValueError
    if a block of `names` is missing or unterminated, or one not in `names`
    is there."""
    out: list[str] = []
    lines = text.splitlines(keepends=True)
    found: list[str] = []
    sources = blocks(root)
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        m = BEGIN.match(line.rstrip("\n"))
        if not m:
            continue
        name, indent = m["name"], m["indent"]
        if name not in names:
            raise ValueError(f"unexpected generated block {name!r}")
        end = indent + END.format(name=name)
        while i < len(lines) and lines[i].rstrip("\n") != end:
            i += 1
        if i == len(lines):
            raise ValueError(f"generated block {name!r} has no end marker")
        out += [f"{indent}{x}\n" if x else "\n" for x in sources[name]()]
        found.append(name)
    missing = set(names) - set(found)
    if missing:
        raise ValueError(f"generated blocks missing: {sorted(missing)}")
    return "".join(out)


def stale(root: Path = ROOT, write: bool = False) -> list[str]:
    """The files whose generated blocks differ from their sources (rewritten
    with `write`), in FILES order."""
    changed = []
    for rel, names in FILES.items():
        path = root / rel
        text = path.read_text()
        new = render(text, names, root)
        if new != text:
            changed.append(rel)
            if write:
                path.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--check", action="store_true", help="only list stale files; 1 if any"
    )
    args = ap.parse_args(argv)
    changed = stale(write=not args.check)
    for rel in changed:
        print(f"{'stale' if args.check else 'rewrote'}: {rel}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
