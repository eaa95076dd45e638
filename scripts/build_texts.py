"""Build the calibration and evaluation texts from two Debian packages: calib.txt, eval.txt, manifest.json.

    python scripts/build_texts.py --download                 # apt-get download + dpkg-deb -x into data/debs/
    python scripts/build_texts.py --out data/texts --eval-novel persuasion --no-handbook   # another split

The packages are found, in this order: --handbook-dir/--austen-dir if given; an extracted copy under --debs
(default data/debs/: debian-handbook/ and r-cran-janeaustenr/); a .deb there (extracted with dpkg-deb -x); the
installed packages (/usr/share/doc/debian-handbook, /usr/lib/R/site-library/janeaustenr); with --download,
``apt-get download`` into --debs (run ``apt-get update`` first if apt has no package lists). Nothing is installed.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from lcompress.integrations.texts import AUSTEN_NOVELS, build_texts, find_austen_dir, find_handbook_dir

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"handbook": "debian-handbook", "austen": "r-cran-janeaustenr"}
INSTALLED = {"handbook": Path("/usr/share/doc/debian-handbook"), "austen": Path("/usr/lib/R/site-library/janeaustenr")}


class Fail(Exception):
    pass


def _found(kind: str, d: Path) -> bool:
    try:
        (find_handbook_dir if kind == "handbook" else find_austen_dir)(d)
        return True
    except FileNotFoundError:
        return False


def _run(cmd: list[str], cwd: Path) -> None:
    if shutil.which(cmd[0]) is None:
        raise Fail(f"{cmd[0]} not found: this needs a Debian/Ubuntu system (or pass --handbook-dir/--austen-dir)")
    print("$", " ".join(cmd), file=sys.stderr)
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise Fail(f"{' '.join(cmd)} failed (exit {r.returncode}): {r.stdout.strip().splitlines()[-1:]}")


def locate(kind: str, debs: Path, download: bool) -> Path:
    pkg = PACKAGES[kind]
    extracted = debs / pkg
    if extracted.is_dir() and _found(kind, extracted):
        return extracted
    deb = sorted(debs.glob(f"{pkg}_*.deb"))
    if not deb and INSTALLED[kind].is_dir() and _found(kind, INSTALLED[kind]):
        return INSTALLED[kind]
    if not deb and download:
        debs.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", pkg], cwd=debs)
        deb = sorted(debs.glob(f"{pkg}_*.deb"))
    if not deb:
        raise Fail(f"{pkg}: not found under {debs} nor installed; run with --download, or: cd {debs} && "
                   f"apt-get download {pkg}")
    _run(["dpkg-deb", "-x", str(deb[-1]), str(extracted)], cwd=debs)
    if not _found(kind, extracted):
        raise Fail(f"{deb[-1]} extracted to {extracted} but holds no {kind} files")
    return extracted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "texts", help="output directory (default data/texts)")
    ap.add_argument("--debs", type=Path, default=ROOT / "data" / "debs",
                    help="where the .debs are downloaded and extracted (default data/debs)")
    ap.add_argument("--download", action="store_true", help="apt-get download the packages if not found")
    ap.add_argument("--handbook-dir", type=Path, help="an extracted debian-handbook (skips the search)")
    ap.add_argument("--austen-dir", type=Path, help="an extracted r-cran-janeaustenr (skips the search)")
    ap.add_argument("--eval-novel", default="emma", choices=sorted(AUSTEN_NOVELS),
                    help="the held-out novel (default emma: the issue's float perplexity 37.4 is measured on it)")
    ap.add_argument("--calib-novels", nargs="*", choices=sorted(AUSTEN_NOVELS),
                    help="novels for calibration (default: all but the held-out one)")
    ap.add_argument("--no-handbook", action="store_true", help="calibrate on the novels only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        austen = args.austen_dir or locate("austen", args.debs, args.download)
        handbook = None if args.no_handbook else (args.handbook_dir or locate("handbook", args.debs, args.download))
        manifest = build_texts(handbook, austen, args.out, eval_novel=args.eval_novel,
                               calib_novels=args.calib_novels, handbook=not args.no_handbook)
    except (Fail, ValueError, FileNotFoundError) as e:
        print(f"build_texts: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), **manifest}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
