"""Protect a dataset split: ``python hub_scripts/protect.py --dataset ID --method sem --output DIR``.

Today this runs the same job as ``uexamples protect`` in one process. Multi-process generation under
``accelerate launch``, resuming and ``--push-to-hub`` with a dataset card are tracked in issue 4.
"""

import sys

from uexamples.cli import main

if __name__ == "__main__":
    sys.exit(main(["protect", *sys.argv[1:]]))
