"""``softserve`` with a bug planted in the stream's encoder: batch 0 of epoch 1 raises a
plain RuntimeError (not a store error), as a defect in the server's own code would."""

from softserve.entry import main
from softserve.service import batches

_encode = batches._parts


def _parts(request, epoch, index, tensors):  # type: ignore[no-untyped-def]
    if (epoch, index) == (1, 0):
        raise RuntimeError("planted bug")
    return _encode(request, epoch, index, tensors)


batches._parts = _parts
main()
