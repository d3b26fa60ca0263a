from helpers import grey_sample_repo, sample_ds, small_ds  # noqa: F401  (session fixtures)
