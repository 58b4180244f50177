"""softserve's HTTP service: streams image/label batches from label-set shards.

Not built yet: the FastAPI server arrives with the serving issue. Nothing here runs.
"""
