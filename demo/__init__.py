"""The demo: synthetic phantom studies, simulated people (QC, readers, blinded readers,
mask edits), synthetic event logs and the training of the demo models. Not production code:
imported only by the command line (``lastmile demo``) and tests, lazily."""
