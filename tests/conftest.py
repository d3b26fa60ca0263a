from helpers import sample_ds, small_ds  # noqa: F401  (session fixtures)
