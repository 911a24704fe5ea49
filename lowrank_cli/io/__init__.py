"""Files: safetensors in and out, the `lowrank` manifest, atomic outputs, run folders, pickle conversion."""

from lowrank_cli.io.atomic import atomic_output, check_output, write_json, write_text
from lowrank_cli.io.manifest import FORMAT_VERSION, MANIFEST_KEY, LayerEntry, Manifest
from lowrank_cli.io.safetensors import (CheckpointHeader, ShardWriter, TensorInfo, TensorReader, load_tensors, open_tensors, read_header,
                                        read_tensors, save_checkpoint, sha256_file, shard_bytes)

__all__ = [
    "FORMAT_VERSION", "MANIFEST_KEY", "CheckpointHeader", "LayerEntry", "Manifest", "TensorInfo", "atomic_output", "check_output",
    "ShardWriter", "TensorReader", "load_tensors", "open_tensors", "read_header", "read_tensors", "save_checkpoint", "sha256_file",
    "shard_bytes", "write_json", "write_text",
]
