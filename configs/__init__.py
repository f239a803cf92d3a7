"""Run configurations: `base.py` holds the defaults, one file per data set overrides them."""
