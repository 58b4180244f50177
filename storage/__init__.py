"""softserve's storage: the HDF5 shard format of a label set, its codecs and its manifest."""

from softserve.format.codecs import CODECS, Codec, get_codec
from softserve.storage.layout import DATASET_FILE, MANIFEST_FILE, PLAN_FILE, shard_file
from softserve.storage.manifest import (
    FORMAT_VERSION,
    LabelSetConfig,
    Manifest,
    RefinementInfo,
    TeacherInfo,
    ViewInfo,
    read_manifest,
)
from softserve.storage.reader import LabelSetReader
from softserve.storage.verify import verify_label_set
from softserve.storage.writer import ShardWriter, write_dataset

__all__ = [
    "CODECS",
    "DATASET_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "Codec",
    "LabelSetConfig",
    "LabelSetReader",
    "Manifest",
    "RefinementInfo",
    "ShardWriter",
    "TeacherInfo",
    "ViewInfo",
    "get_codec",
    "read_manifest",
    "shard_file",
    "verify_label_set",
    "write_dataset",
]
