"""Protect a dataset split on one or many processes, resumably, and publish it with a dataset card.

    python hub_scripts/protect.py --dataset user/images --method sem --output out/
    accelerate launch --num_processes 4 hub_scripts/protect.py --dataset user/images --method sem \\
        --output out/ --push-to-hub user/images-protected

The code lives in ``uexamples/hub_scripts/protect.py`` (its docstring and ``--help`` say everything), so
that a pip install runs the same script: ``accelerate launch -m uexamples.hub_scripts.protect ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's uexamples, installed or not
from uexamples.hub_scripts.protect import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
