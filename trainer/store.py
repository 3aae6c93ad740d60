"""Feature store `img-features/1`: precomputed aligner training triplets on disk.

Layout of a store folder:

    STORE/manifest.json
        {"format": "img-features/1", "num_samples": int, "image_tokens": Si, "image_dim": D,
         "guidance_dim": Dg, "guidance_mode": "question"|"dialogue", "chat_template": str|null,
         "mllm": str|null, "image_encoder": str|null, "shards": [file names], ...}
        Extra keys written here (readers must ignore keys they do not know): "dtype",
        "image_feature_kind", "preset", "shard_sizes", "skipped" ({"ties", "corrupt", ...}),
        "bytes_per_sample", "shard_sha256" ({file name: sha256 hex digest of the file}).
    STORE/shard-000000.safetensors, shard-000001.safetensors, ...
        image_w        [n, Si, D]   winner's image features (float16, bfloat16 or float32)
        image_l        [n, Si, D]   loser's image features
        guidance       [n, Sg, Dg]  guidance of (loser image, caption); zero-padded to the shard's
                                    longest sample
        guidance_mask  [n, Sg]      bool, True = real token
        source_index   [n]          int64, optional: row of the sample in the source dataset

Shard `j` holds source rows [j*shard_size, (j+1)*shard_size) minus skipped ones, so shard names do not
depend on how many processes wrote them, and an interrupted extraction skips the shards that exist.
Every shard is written to a temporary name and renamed, so a shard that exists is complete.

Integrity: each shard carries a sha256 of its own content (tensors and metadata) in its header
("content_sha256", checked by `verify_shard_content`), so a re-extract re-verifies every shard against
itself, without trusting a manifest that may be damaged or missing. The manifest also records each shard's
file sha256, which `FeatureStore` verifies when it opens the store (one sequential read of the shards), so
flipped bytes, truncation or a missing shard are refused
with the file named; a manifest that is not the documented JSON object is refused naming the field.
Non-finite values are never written: `write_shard` refuses them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from img_core.errors import CorruptFileError
from img_core.integrity import nonfinite_tensors, sha256_file, verify_checksum

logger = logging.getLogger(__name__)

FORMAT = "img-features/1"
MANIFEST_NAME = "manifest.json"
# Required manifest fields and their JSON types (ints, a string, a list of shard file names).
REQUIRED_FIELDS = {"num_samples": int, "image_tokens": int, "image_dim": int, "guidance_dim": int,
                   "guidance_mode": str, "shards": list}
REQUIRED_KEYS = tuple(REQUIRED_FIELDS)
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.safetensors"


@dataclass
class FeatureSample:
    """One training triplet before storage. image_w, image_l: (Si, D); guidance: (Sg, Dg), all real tokens."""

    image_w: torch.Tensor
    image_l: torch.Tensor
    guidance: torch.Tensor
    source_index: int = -1


def write_shard(
    path: str | Path, samples: list[FeatureSample], dtype: str = "float16", metadata: dict | None = None
) -> int:
    """Stack, pad and write `samples` to one shard atomically. Returns the number of bytes written.

    `metadata` (str -> str) goes into the safetensors header; an empty `samples` list writes a shard
    with n = 0 (so the range counts as done)."""
    from safetensors.torch import save_file

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    torch_dtype = STORAGE_DTYPES[dtype]
    path = Path(path)
    if samples:
        longest = max(sample.guidance.shape[0] for sample in samples)
        guidance = torch.zeros(len(samples), longest, samples[0].guidance.shape[-1], dtype=torch_dtype)
        mask = torch.zeros(len(samples), longest, dtype=torch.bool)
        for row, sample in enumerate(samples):
            length = sample.guidance.shape[0]
            guidance[row, :length] = sample.guidance.to(torch_dtype)
            mask[row, :length] = True
        tensors = {
            "image_w": torch.stack([s.image_w for s in samples]).to(torch_dtype),  # (n, Si, D)
            "image_l": torch.stack([s.image_l for s in samples]).to(torch_dtype),  # (n, Si, D)
            "guidance": guidance,  # (n, Sg, Dg)
            "guidance_mask": mask,  # (n, Sg)
            "source_index": torch.tensor([s.source_index for s in samples], dtype=torch.int64),  # (n,)
        }
    else:
        tensors = {
            "image_w": torch.zeros(0, 0, 0, dtype=torch_dtype),
            "image_l": torch.zeros(0, 0, 0, dtype=torch_dtype),
            "guidance": torch.zeros(0, 0, 0, dtype=torch_dtype),
            "guidance_mask": torch.zeros(0, 0, dtype=torch.bool),
            "source_index": torch.zeros(0, dtype=torch.int64),
        }
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"refusing to write {path}: {', '.join(bad)} hold NaN or inf (after casting to {dtype})")
    header = {key: str(value) for key, value in (metadata or {}).items()}
    header["num_samples"] = str(len(samples))
    header[CONTENT_DIGEST_KEY] = content_sha256(tensors, header)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path.stat().st_size


CONTENT_DIGEST_KEY = "content_sha256"


def content_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of a shard's content: each tensor's name, dtype, shape and bytes, and every metadata entry
    except the digest itself, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    for key in sorted(metadata):
        if key != CONTENT_DIGEST_KEY:
            digest.update(f"{key}={metadata[key]}\n".encode())
    return digest.hexdigest()


def verify_shard_content(path: str | Path) -> bool:
    """Read the whole shard and check it against the content digest in its own header. False when the
    shard records none (written by an older trainer.extract); CorruptFileError when it is unreadable or
    its content differs."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors reports damage as several error types
        raise CorruptFileError(f"{path} is not a readable shard ({error})") from error
    recorded = metadata.get(CONTENT_DIGEST_KEY)
    if recorded is None:
        return False
    actual = content_sha256(tensors, metadata)
    if actual != recorded:
        raise CorruptFileError(f"{path} is damaged: its content sha256 is {actual[:16]}..., its header records "
                               f"{recorded[:16]}...")
    return True


def read_shard_header(path: str | Path) -> dict:
    """Metadata and tensor shapes of a shard without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    return {"metadata": metadata, "shapes": shapes, "num_samples": shapes["image_w"][0] if shapes else 0}


def write_manifest(store_dir: str | Path, fields: dict, shard_names: list[str] | None = None) -> dict:
    """Write STORE/manifest.json listing the non-empty shards (`shard_names`, default: every shard in the
    folder); returns the manifest.

    `fields` gives guidance_mode, chat_template, mllm, image_encoder and any extra keys; the sample count,
    dims, shard list and bytes per sample are read from the shards themselves."""
    store_dir = Path(store_dir)
    shards, sizes, digests, total_bytes = [], [], {}, 0
    dims = None
    names = shard_names if shard_names is not None else sorted(p.name for p in store_dir.glob("shard-*.safetensors"))
    for path in (store_dir / name for name in names):
        header = read_shard_header(path)
        if header["num_samples"] == 0:
            continue
        _, image_tokens, image_dim = header["shapes"]["image_w"]
        shard_dims = (image_tokens, image_dim, header["shapes"]["guidance"][2])
        if dims is not None and shard_dims != dims:
            raise ValueError(f"{path} has dims (Si, D, Dg) = {shard_dims}, other shards have {dims}")
        dims = shard_dims
        shards.append(path.name)
        sizes.append(header["num_samples"])
        digests[path.name] = sha256_file(path)
        total_bytes += path.stat().st_size
    if dims is None:
        raise ValueError(f"no non-empty shards in {store_dir}: nothing to describe")
    num_samples = sum(sizes)
    manifest = {
        "format": FORMAT,
        "num_samples": num_samples,
        "image_tokens": dims[0],
        "image_dim": dims[1],
        "guidance_dim": dims[2],
        "guidance_mode": fields.get("guidance_mode", "question"),
        "chat_template": fields.get("chat_template"),
        "mllm": fields.get("mllm"),
        "image_encoder": fields.get("image_encoder"),
        "shards": shards,
        "shard_sizes": sizes,
        "shard_sha256": digests,
        "bytes_per_sample": round(total_bytes / num_samples, 1),
    }
    manifest.update({k: v for k, v in fields.items() if k not in manifest})
    tmp = store_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, store_dir / MANIFEST_NAME)
    return manifest


def sample_is_finite(sample: FeatureSample, dtype: str = "float16") -> bool:
    """Whether every feature of `sample` is finite once cast to the storage dtype (float16 overflows
    to inf above 65504)."""
    tensors = {"image_w": sample.image_w, "image_l": sample.image_l, "guidance": sample.guidance}
    return not nonfinite_tensors({k: v.to(STORAGE_DTYPES[dtype]) for k, v in tensors.items()})


def _json_type(value) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_manifest(store_dir: str | Path) -> dict:
    """STORE/manifest.json, checked: a JSON object with every required field of the right type and a
    plain shard file name per entry. Errors name the file and the field."""
    path = Path(store_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a feature store (run trainer.extract)")
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not a text file ({error}): re-run trainer.extract to rewrite it") from error
    except json.JSONDecodeError as error:
        raise CorruptFileError(
            f"{path} is not valid JSON ({error.msg}: line {error.lineno}, column {error.colno}); it is damaged "
            "or truncated: re-run trainer.extract with the same --out to rewrite it"
        ) from error
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, it holds {_json_type(manifest)}")
    if manifest.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: field \"format\" is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise CorruptFileError(f"{path} lacks the fields {missing}")
    for key, kind in REQUIRED_FIELDS.items():
        value = manifest[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CorruptFileError(
                f"{path}: field \"{key}\" must be {_json_type(kind())}, found {_json_type(value)}"
                + (f" ({json.dumps(value)[:60]})" if value is not None else "")
            )
    for name in manifest["shards"]:
        if not isinstance(name, str) or Path(name).name != name or not name:
            raise CorruptFileError(f"{path}: field \"shards\" must list shard file names, found {name!r:.60}")
    digests = manifest.get("shard_sha256")
    if digests is not None:
        if not isinstance(digests, dict):
            raise CorruptFileError(
                f"{path}: field \"shard_sha256\" must be an object {{file name: sha256}}, found {_json_type(digests)}"
            )
        unlisted = [name for name in manifest["shards"] if not isinstance(digests.get(name), str)]
        if unlisted:
            raise CorruptFileError(f"{path}: field \"shard_sha256\" has no digest for {unlisted[:5]}")
    return manifest


def bytes_per_sample(
    image_tokens: int, image_dim: int, guidance_tokens: int, guidance_dim: int, dtype: str = "float16"
) -> int:
    """Tensor bytes of one stored triplet (excluding the few-hundred-byte shard header)."""
    itemsize = torch.empty(0, dtype=STORAGE_DTYPES[dtype]).element_size()
    features = (2 * image_tokens * image_dim + guidance_tokens * guidance_dim) * itemsize
    return features + guidance_tokens + 8  # bool mask + int64 source index


class FeatureStore(torch.utils.data.Dataset):
    """Random access to the triplets of an `img-features/1` store.

    `store[i]` is a dict with image_w, image_l (Si, D), guidance (Sg_i, Dg) and guidance_mask (Sg_i,)
    in the stored dtype, where trailing padding of the shard has been cut off. Batch with
    `collate_features`. Shards are memory-mapped and opened lazily (safe to use in DataLoader workers).
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        self.manifest = read_manifest(self.path)
        self.shard_paths = [self.path / name for name in self.manifest["shards"]]
        self.shard_sizes = []
        self.max_guidance_tokens = 0  # the longest guidance of any sample (shards are padded to their longest)
        digests = self.manifest.get("shard_sha256")
        if verify and digests is None:
            logger.warning("%s records no shard checksums (written by an older trainer.extract): integrity "
                           "not verified", manifest_path)
        for shard_path in self.shard_paths:
            if not shard_path.is_file():
                raise FileNotFoundError(
                    f"{shard_path} is listed in the manifest but missing: re-run trainer.extract with the same "
                    "--out to re-extract it"
                )
            if verify and digests is not None:
                try:
                    verify_checksum(shard_path, digests[shard_path.name])
                except CorruptFileError as error:
                    raise CorruptFileError(
                        f"{error}: re-run trainer.extract with the same --out to re-extract it"
                    ) from error
            try:
                header = read_shard_header(shard_path)
            except Exception as error:  # noqa: BLE001 - safetensors reports damage as several error types
                raise CorruptFileError(
                    f"{shard_path} is not a readable shard ({error}): re-run trainer.extract to re-extract it"
                ) from error
            expected = [self.manifest["image_tokens"], self.manifest["image_dim"]]
            if header["shapes"]["image_w"][1:] != expected or header["shapes"]["guidance"][2] != self.guidance_dim:
                raise ValueError(f"{shard_path} does not match the manifest's dims (Si, D, Dg)")
            self.shard_sizes.append(header["num_samples"])
            self.max_guidance_tokens = max(self.max_guidance_tokens, header["shapes"]["guidance"][1])
        if sum(self.shard_sizes) != self.manifest["num_samples"]:
            raise ValueError(
                f"{manifest_path} says {self.manifest['num_samples']} samples, shards hold {sum(self.shard_sizes)}"
            )
        self.offsets = torch.tensor([0, *self.shard_sizes]).cumsum(0).tolist()
        self._handles: dict[int, object] = {}

    @property
    def image_tokens(self) -> int:
        return self.manifest["image_tokens"]

    @property
    def image_dim(self) -> int:
        return self.manifest["image_dim"]

    @property
    def guidance_dim(self) -> int:
        return self.manifest["guidance_dim"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.shard_paths[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a store of {len(self)}")
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        handle = self._handle(shard)
        mask = handle.get_slice("guidance_mask")[row]  # (Sg,)
        length = int(mask.nonzero().max()) + 1 if mask.any() else 0
        return {
            "image_w": handle.get_slice("image_w")[row],  # (Si, D)
            "image_l": handle.get_slice("image_l")[row],  # (Si, D)
            "guidance": handle.get_slice("guidance")[row, :length],  # (Sg_i, Dg)
            "guidance_mask": mask[:length],  # (Sg_i,)
        }


def collate_features(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack store samples into a batch, zero-padding guidance to the batch's longest."""
    longest = max(sample["guidance"].shape[0] for sample in samples)
    first = samples[0]["guidance"]
    guidance = torch.zeros(len(samples), longest, first.shape[-1], dtype=first.dtype)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for row, sample in enumerate(samples):
        length = sample["guidance"].shape[0]
        guidance[row, :length] = sample["guidance"]
        mask[row, :length] = sample["guidance_mask"]
    return {
        "image_w": torch.stack([s["image_w"] for s in samples]),  # (B, Si, D)
        "image_l": torch.stack([s["image_l"] for s in samples]),  # (B, Si, D)
        "guidance": guidance,  # (B, Sg, Dg)
        "guidance_mask": mask,  # (B, Sg)
    }


def synthetic_target(image_l: torch.Tensor, guidance: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """The known winner of a synthetic store: the loser shifted by a function of the guidance,
    win = lose + tanh(mean_tokens(guidance) @ mixing), broadcast over image tokens.

    image_l (Si, D), guidance (Sg, Dg) real tokens only, mixing (Dg, D) -> (Si, D)."""
    return image_l + torch.tanh(guidance.mean(dim=0) @ mixing)[None, :]


def write_synthetic_store(
    path: str | Path,
    num_samples: int,
    image_tokens: int = 4,
    image_dim: int = 32,
    guidance_dim: int = 16,
    guidance_tokens: tuple[int, int] = (3, 8),
    shard_size: int = 64,
    dtype: str = "float32",
    seed: int = 0,
    target_scale: float = 2.0,
) -> dict:
    """A store of random triplets whose winner is `synthetic_target` of loser and guidance, for tests
    and benchmarks. Each sample's guidance tokens share a random per-sample direction (plus noise), so
    the shift differs between samples and can only be predicted from the guidance."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(guidance_dim, image_dim, generator=generator) * target_scale / guidance_dim**0.5
    samples: list[FeatureSample] = []
    shard = 0
    for index in range(num_samples):
        length = int(torch.randint(guidance_tokens[0], guidance_tokens[1] + 1, (1,), generator=generator))
        direction = torch.randn(1, guidance_dim, generator=generator)
        guidance = direction + 0.1 * torch.randn(length, guidance_dim, generator=generator)  # (Sg, Dg)
        image_l = torch.randn(image_tokens, image_dim, generator=generator)  # (Si, D)
        samples.append(FeatureSample(synthetic_target(image_l, guidance, mixing), image_l, guidance, index))
        if len(samples) == shard_size or index == num_samples - 1:
            write_shard(path / shard_name(shard), samples, dtype=dtype)
            samples, shard = [], shard + 1
    return write_manifest(
        path,
        {"guidance_mode": "question", "mllm": "synthetic", "image_encoder": "synthetic", "dtype": dtype},
    )
