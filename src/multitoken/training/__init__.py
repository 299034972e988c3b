"""Training: one loop for every head family (:mod:`~multitoken.training.trainer`), its data
(:mod:`~multitoken.training.data`, :mod:`~multitoken.training.packing`,
:mod:`~multitoken.training.conversations`, :mod:`~multitoken.training.distill`), losses
(:mod:`~multitoken.training.losses`), the frozen-trunk feature cache
(:mod:`~multitoken.training.featcache`), evaluation (:mod:`~multitoken.training.evaluate`) and the
scaling plot (:mod:`~multitoken.training.plot`)."""
