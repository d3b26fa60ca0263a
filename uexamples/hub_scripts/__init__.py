"""Scripts for ``accelerate launch``, shipped inside the package so that a pip install can run them:
``accelerate launch -m uexamples.hub_scripts.protect ...`` (or the ``uexamples-hub-protect`` command on one
process). ``hub_scripts/protect.py`` in the repository is the same script, the documented entry point."""
