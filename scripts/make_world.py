"""Build the embedded world (and optionally the OpenMoji set) and print where it went.

    python scripts/make_world.py                                  # the world of the default recipe
    python scripts/make_world.py world.n_train=2000 world.image_size=64 world.with_speech=false
    python scripts/make_world.py --recipe my_run --workers 1
    python scripts/make_world.py --openmoji openmoji.image_size=64 openmoji.with_speech=false

``world.*`` overrides apply to the recipe's ``world`` section; ``openmoji.*`` ones to OpenMojiConfig.
Building again with the same configuration does nothing (the output folder is keyed on it).
"""

from __future__ import annotations

import argparse
import sys
import time

from anyloom.config import ConfigError, build, parse_override, set_dotted
from anyloom.data.openmoji import OpenMojiConfig, build_openmoji
from anyloom.recipes import load_recipe
from anyloom.world.dataset import build_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="world", help="recipe whose world section to build (name or path)")
    p.add_argument("--workers", type=int, default=None, help="processes for the world (default: up to 2)")
    p.add_argument("--openmoji", action="store_true", help="also build the OpenMoji image/name/speech set")
    p.add_argument("overrides", nargs="*", help="world.key=value or openmoji.key=value")
    args = p.parse_intermixed_args(argv)

    world_overrides = [o for o in args.overrides if not o.startswith("openmoji.")]
    emoji_tree: dict = {}
    try:
        for text in args.overrides:
            if text.startswith("openmoji."):
                keys, value = parse_override(text)
                set_dotted(emoji_tree, keys, value)
        bad = [o for o in world_overrides if not o.startswith("world.")]
        if bad:
            raise ConfigError(f"override {bad[0]!r}: make_world takes world.* and openmoji.* overrides only")
        cfg = load_recipe(args.recipe, world_overrides).world
        emoji_cfg = build(OpenMojiConfig, emoji_tree.get("openmoji", {}), prefix="openmoji")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    paths = build_world(cfg, workers=args.workers)
    print(f"world: {paths.dir} ({time.perf_counter() - t0:.1f} s)")
    for split in paths.splits:
        print(f"  {split:<14} {paths.counts[split]:>6} items  {paths.split(split)}")
    if args.openmoji:
        t0 = time.perf_counter()
        om = build_openmoji(emoji_cfg)
        print(f"openmoji: {om.dir} ({time.perf_counter() - t0:.1f} s; CC BY-SA 4.0, see {om.dir / 'LICENSE.txt'})")
        for split in ("train", "val", "test"):
            print(f"  {split:<14} {om.counts[split]:>6} items  {getattr(om, split)}")
        print(f"  skipped: {om.counts['skipped_unnamed']} without a Unicode name, "
              f"{om.counts['skipped_empty']} that render empty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
