"""Make sure Debian's headless Chromium is on PATH for the browser test.

Installs the Debian packages ``chromium`` and ``chromium-driver`` with apt-get
when the binary is missing and we are root (CI) or have password-less sudo.
Otherwise prints what to install and exits 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main() -> int:
    if shutil.which("chromium"):
        return 0
    if shutil.which("apt-get") is None:
        print("chromium is missing and apt-get is not available: install Chromium and put `chromium` on PATH",
              file=sys.stderr)
        return 1
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(prefix + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(prefix + ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True,
                       env=env, stdout=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"could not install chromium ({exc}); run: sudo apt-get install chromium chromium-driver",
              file=sys.stderr)
        return 1
    return 0 if shutil.which("chromium") else 1


if __name__ == "__main__":
    sys.exit(main())
