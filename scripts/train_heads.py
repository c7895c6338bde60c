#!/usr/bin/env python3
"""Train EntMTP draft heads (Medusa, Hydra, shared MTP) by self-distillation; see --help.

One GPU run does everything:  python scripts/train_heads.py all --device cuda --out runs/heads
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srt_entmtp.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
