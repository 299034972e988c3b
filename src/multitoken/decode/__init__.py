"""Decoding: the trunk alone, or self-speculative decoding with the MTP heads.

:mod:`~multitoken.decode.api` (``generate``) plans a run and loops over steps;
:mod:`~multitoken.decode.phases` holds the phases of one step over explicit state (prefill, draft,
verify, accept, commit, emit, retire); :mod:`~multitoken.decode.trees` the same phases over draft
trees; :mod:`~multitoken.decode.costs` and :mod:`~multitoken.decode.pace` decide whether and how
far to draft; :mod:`~multitoken.decode.sampling` the acceptance rules;
:mod:`~multitoken.decode.kvcache` the ragged batch's cache; :mod:`~multitoken.decode.kernels` the
CPU linear kernels. docs/architecture.md draws the map.
"""
