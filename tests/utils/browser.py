"""Debian's Chromium for the browser tests (`make test` installs it), headless."""

from __future__ import annotations

import shutil

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's own notes say: without the background-networking flags Chromium
# keeps trying to reach Google's hosts, which a closed network refuses.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
