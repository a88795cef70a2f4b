from __future__ import annotations

from .cli import main

# Guarded: worker processes are spawned and import the main module again.
if __name__ == "__main__":
    raise SystemExit(main())
