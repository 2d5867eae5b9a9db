"""Write the lock: the exact version of every package installed in this environment.

``make`` installs with ``-c requirements/lock.txt``, so a fresh machine gets the
versions the committed chapter outputs were computed with. Local version labels
are dropped (``torch==2.13.0+cpu`` becomes ``torch==2.13.0``), so the same lock
accepts the CPU wheel and a CUDA build of the same release. The project itself is
left out: it is installed from the working tree.

Usage: python tools/lock.py requirements/lock.txt
"""

import platform
import re
import subprocess
import sys

HEADER = """\
# Exact versions of everything `make install` puts into .venv: the versions the
# committed chapter outputs were computed with. Written by `make lock`
# (tools/lock.py) on Python {python}, {system} {machine}; used as a pip
# constraints file, so packages a platform does not need are simply not installed.
# tests/test_layout.py checks it against pyproject.toml and environment.yml.
"""


def frozen() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    lines = []
    for line in out.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^+\s]+)(\+\S+)?", line.strip())
        if m is None:
            raise SystemExit(f"cannot lock {line!r}: not a name==version requirement "
                             "(install the package from an index, not a path or URL)")
        if m.group(1).lower() != "gradtools":
            lines.append(f"{m.group(1)}=={m.group(2)}")
    return sorted(lines, key=str.lower)


def main(path: str) -> None:
    text = HEADER.format(python=platform.python_version(), system=platform.system(),
                         machine=platform.machine())
    with open(path, "w") as f:
        f.write(text + "\n".join(frozen()) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
