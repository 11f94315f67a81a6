"""On-disk formats of lightning-opd, one package per format version.

``logprob_store_v1`` is the single home of the logprob store format: version, Arrow schema, Parquet
writer options, path templates, the typed manifest and the invariants every row satisfies.
"""
