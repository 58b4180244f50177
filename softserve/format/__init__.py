"""softserve's format kernel: what the worker, the storage layer, the server and the client
share byte for byte.

The wire payload and its framing (:mod:`.payload`), the label codecs (:mod:`.codecs`) and
the one label decoder (:mod:`.labels`), GIFT refinement and logit recovery
(:mod:`.refinement`) on NumPy or torch (:mod:`.arrays`), epoch sampling and sharding
(:mod:`.sampling`), the view and mix parameters (:mod:`.augment`) and the JSON schema
(:mod:`.schema`). It imports neither torch at module level nor h5py, so the server's
request path and the storage layer load it without either; everything above imports it.
"""
