"""Extract aligner training triplets from Pick-a-Pic-style pairs into a feature store (img-features/1).

    python -m trainer.extract --dataset PARQUET_DIR --preset sdxl --out STORE [--guidance-mode dialogue] [--limit N]
    accelerate launch -m trainer.extract --dataset PARQUET_DIR --preset sdxl --out STORE

For each pair that is not a tie (REFERENCE §6): the preset's IP-Adapter tokens of the winner and of the
loser, and the MLLM guidance of (loser image, caption) with the question template drawn by the pair's row
number (plus --seed); in dialogue mode the MLLM first writes its critique of the loser, which is then
teacher-forced into the guidance. Source rows are cut into shards of --shard-size rows; process p of P
extracts shards p, p+P, ... and skips shards that already exist, so a killed extraction continues where it
stopped. Every existing shard is re-verified against its own content digest on every rerun (never trusted
because a manifest lists it: the manifest may be truncated or missing); a shard that is damaged
(unreadable, its content differs from its digest, or an older shard without a digest whose bytes differ
from the manifest's sha256 or that no manifest vouches for) is re-extracted. Unreadable images are skipped, counted and reported, never fatal; so are pairs
whose features are not finite (NaN or inf, e.g. float16 overflow), which are never stored. The main
process writes STORE/manifest.json (with every shard's sha256) when all shards are done.

`OnlineTriplets` computes the same triplets on demand for `trainer.train --online`.

Dialogue-mode guidance (an aligner for edited critiques). The released aligners were trained on
question-mode guidance (image + question). In dialogue mode a round's guidance is image + question + the
critique, teacher-forced as the assistant's answer, so an edited critique steers. To train an aligner for
it, extract with `--guidance-mode dialogue`. Pick-a-Pic has no critiques, so the critique of each pair's
losing image comes from one of two sources, recorded in the manifest as "critique_source":
  * "mllm" (default): the MLLM writes it greedily from the same question (`MLLMCritic.read`, at most
    --max-critique-tokens), exactly the text the app shows as the untouched critique;
  * "column:NAME" (`--critique-column NAME`): a written critique per row from that column of the source,
    e.g. human or stronger-model critiques that resemble what users type; an empty cell falls back to the
    MLLM's own critique.
Recipe:
    python -m trainer.extract --dataset PICKAPIC --preset sdxl --guidance-mode dialogue --out STORE_D
    python -m trainer.train --features STORE_D --out RUN_D          # the aligner records guidance_mode
    python -m img_core refine ... --aligner RUN_D/final --guidance-mode dialogue --critique "..."
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from img_core.errors import CorruptFileError, InvalidInputError
from img_core.images import load_image
from img_core.integrity import sha256_file
from img_core.session import IMGSession
from img_core.settings import DEFAULT_MAX_CRITIQUE_TOKENS, MLLM_GUIDANCE_MODES
from trainer import option, parse_config
from trainer.data import PreferencePairs
from trainer.loop import output_folder
from trainer.store import (
    STORAGE_DTYPES,
    FeatureSample,
    read_manifest,
    read_shard_header,
    sample_is_finite,
    shard_name,
    verify_shard_content,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)

SKIP_REASONS = ("ties", "corrupt", "empty_caption", "nonfinite")
# Shard metadata that must agree between a finished shard and the run that would reuse it.
SETTINGS_RECORDED = ("preset", "mllm", "guidance_mode", "seed", "dtype", "shard_size")


@dataclass
class ExtractConfig:
    dataset: str = option("", "folder of Pick-a-Pic-style parquet files, one parquet file, or a hub dataset id")
    out: str = option("", "store folder to write (shards + manifest.json)")
    preset: str = option("sdxl", "img_core preset whose IP-Adapter and MLLM make the features")
    guidance_mode: str = option("question", "MLLM guidance mode", choices=list(MLLM_GUIDANCE_MODES))
    questions: str | None = option(None, "question source: ours, release or a JSON file (default: the preset's)")
    mllm: str | None = option(None, "MLLM name or folder instead of the preset's (e.g. a fine-tuned one)")
    quantization: str | None = option(None, "MLLM quantization (default: nf4 on CUDA, none on CPU)")
    limit: int | None = option(None, "use only the first N rows of the source")
    shard_size: int = option(128, "source rows per shard")
    dtype: str = option("float16", "storage dtype", choices=list(STORAGE_DTYPES))
    seed: int = option(0, "offset of the per-row seed that picks the question template")
    max_critique_tokens: int = option(DEFAULT_MAX_CRITIQUE_TOKENS, "dialogue mode: longest critique")
    critique_column: str | None = option(
        None, "dialogue mode: column holding a written critique of the losing image (default: the MLLM writes it)"
    )
    split: str = option("train", "split of a hub dataset")
    device: str | None = option(None, "device (default: this process's accelerator device)")

    def check(self) -> None:
        if not self.dataset or not self.out:
            raise ValueError("--dataset and --out are required")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.critique_column and self.guidance_mode != "dialogue":
            raise ValueError(f"--critique-column {self.critique_column} needs --guidance-mode dialogue (question-mode "
                             "guidance does not read a critique)")

    def critique_source(self) -> str | None:
        """Where dialogue-mode critiques come from: "mllm" or "column:NAME" (None in question mode)."""
        if self.guidance_mode != "dialogue":
            return None
        return f"column:{self.critique_column}" if self.critique_column else "mllm"


class FeatureExtractor:
    """The preset's diffusion backend (for its IP-Adapter image path) and MLLM critic, loaded once by an
    img_core session without its aligner, which extraction does not use."""

    def __init__(self, preset: str, device: str | torch.device, mllm: str | None = None,
                 quantization: str | None = None, tiny_root: str | Path | None = None, questions: str | None = None):
        session = IMGSession.from_preset(
            preset, device=device, mllm=mllm, quantization=quantization, tiny_root=tiny_root,
            show_progress_bars=False, questions=questions,
        ).load(["diffusion", "mllm"])
        self.preset = session.base_preset
        self.device = session.device
        self.backend = session.backend
        self.critic = session.critic

    def store_fields(self, guidance_mode: str) -> dict:
        """What a store (and an aligner trained on it) must record about these features."""
        ip = self.preset.ip_adapter
        encoder = ip.image_encoder if self.preset.family == "flux" else f"{ip.repo}/{ip.image_encoder}"
        image_tokens, image_dim = self.backend.image_features_shape()
        return {
            "image_tokens": image_tokens,
            "image_dim": image_dim,
            "guidance_dim": self.critic.hidden_size,
            "guidance_mode": guidance_mode,
            "chat_template": self.critic.spec.chat_template,
            "mllm": self.critic.spec.name,
            "image_encoder": encoder,
            "image_feature_kind": self.backend.feature_kind,
            "preset": self.preset.name,
            "question_source": self.critic.questions.name,
        }

    def triplet(self, caption: str, winner, loser, guidance_mode: str, seed: int,
                max_critique_tokens: int = DEFAULT_MAX_CRITIQUE_TOKENS, critique: str | None = None) -> FeatureSample:
        """Features of one pair; images are PIL images, `seed` picks the question template. The guidance is
        what a round computes (`MLLMCritic.read`): dialogue mode teacher-forces `critique`, or the MLLM's
        own critique when it is None or blank."""
        reading = self.critic.read(loser, caption, seed=seed, mode=guidance_mode, critique=critique,
                                   write_critique=False, max_new_tokens=max_critique_tokens)
        guidance = reading.guidance
        return FeatureSample(
            image_w=self.backend.image_features(winner)[0],  # (Si, D)
            image_l=self.backend.image_features(loser)[0],  # (Si, D)
            guidance=guidance[0],  # (Sg, Dg)
        )


def read_pair(pairs: PreferencePairs, row: int):
    """(caption, winner image, loser image), or the reason the row is skipped."""

    try:
        pair = pairs[row]
    except ValueError:  # an image cell without bytes
        return "corrupt"
    if pair is None:
        return "ties"
    if not pair.caption.strip():
        return "empty_caption"
    try:
        return pair.caption.strip(), load_image(pair.winner), load_image(pair.loser), pair.critique
    except InvalidInputError:
        return "corrupt"


def recorded_digests(out: Path) -> dict[str, str]:
    """Shard sha256 digests of an existing manifest in `out` ({} when there is none or it is damaged)."""
    try:
        return read_manifest(out).get("shard_sha256") or {}
    except FileNotFoundError:
        return {}
    except CorruptFileError as error:
        logger.warning("%s; it will be rewritten", error)
        return {}


def extract(cfg: ExtractConfig, tiny_root: str | Path | None = None,
            extractor: FeatureExtractor | None = None) -> dict:
    """Write this process's missing or damaged shards; the main process then writes and returns the
    manifest. `extractor`: already loaded models to use instead of loading cfg.preset's."""
    cfg.check()
    with output_folder(cfg.out):  # a failing extraction leaves no empty --out folder
        return extract_shards(cfg, tiny_root, extractor)


def extract_shards(cfg: ExtractConfig, tiny_root: str | Path | None, extractor: FeatureExtractor | None) -> dict:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # `accelerate launch --cpu` sets it
    out = Path(cfg.out)
    pairs = PreferencePairs(cfg.dataset, limit=cfg.limit, split=cfg.split, critique_column=cfg.critique_column)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(pairs) // cfg.shard_size)
    settings = {"preset": cfg.preset, "mllm": cfg.mllm, "guidance_mode": cfg.guidance_mode, "seed": cfg.seed,
                "dtype": cfg.dtype, "shard_size": cfg.shard_size}
    if cfg.critique_column:  # recorded only when set, so shards of earlier runs stay comparable
        settings["critique_column"] = cfg.critique_column

    def rows_of(shard: int) -> range:
        return range(shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, len(pairs)))

    digests = recorded_digests(out)

    def finished(shard: int) -> bool:
        path = out / shard_name(shard)
        if not path.exists():
            return False
        damage = None
        try:
            metadata = read_shard_header(path)["metadata"]
            if not verify_shard_content(path):  # an older shard without its own digest: the manifest must vouch
                expected = digests.get(path.name)
                if expected is None:
                    damage = "it records no content digest and no intact manifest lists its sha256"
                elif sha256_file(path) != expected:
                    damage = "its sha256 differs from the manifest's"
        except CorruptFileError as error:
            damage = str(error)
        except Exception as error:  # noqa: BLE001 - safetensors reports damage as several error types
            damage = f"unreadable: {error}"
        if damage:
            logger.warning("%s is damaged (%s): re-extracting it", path, damage)
            path.unlink()
            return False
        recorded = json.loads(metadata.get("settings", "{}"))
        if recorded != settings:
            raise ValueError(f"{path} was extracted with {recorded}, this run uses {settings}: use another --out")
        return metadata.get("rows") == f"{rows_of(shard).start}:{rows_of(shard).stop}"  # else --limit changed

    todo = [s for s in range(state.process_index, num_shards, state.num_processes) if not finished(s)]
    if todo:
        if extractor is None:
            extractor = FeatureExtractor(cfg.preset, cfg.device or state.device, cfg.mllm, cfg.quantization, tiny_root,
                                         questions=cfg.questions)
        fields = extractor.store_fields(cfg.guidance_mode)
        progress = tqdm(total=sum(len(rows_of(s)) for s in todo), desc=f"extract [{state.process_index}]",
                        position=state.process_index, disable=None)
        for shard in todo:
            samples, skipped, corrupt_rows, nonfinite_rows = [], dict.fromkeys(SKIP_REASONS, 0), [], []
            for row in rows_of(shard):
                read = read_pair(pairs, row)
                progress.update(1)
                if isinstance(read, str):
                    skipped[read] += 1
                    if read == "corrupt":
                        corrupt_rows.append(row)
                        logger.warning("row %d: unreadable image, skipped", row)
                    continue
                caption, winner, loser, critique = read
                sample = extractor.triplet(
                    caption, winner, loser, cfg.guidance_mode, cfg.seed + row, cfg.max_critique_tokens, critique
                )
                sample.source_index = row
                if not sample_is_finite(sample, cfg.dtype):
                    skipped["nonfinite"] += 1
                    nonfinite_rows.append(row)
                    logger.warning("row %d: non-finite features (NaN or inf in %s), skipped", row, cfg.dtype)
                    continue
                samples.append(sample)
            metadata = {"rows": f"{rows_of(shard).start}:{rows_of(shard).stop}", "settings": json.dumps(settings),
                        "fields": json.dumps(fields), "skipped": json.dumps(skipped),
                        "corrupt_rows": json.dumps(corrupt_rows), "nonfinite_rows": json.dumps(nonfinite_rows)}
            write_shard(out / shard_name(shard), samples, dtype=cfg.dtype, metadata=metadata)
        progress.close()
    state.wait_for_everyone()

    manifest = None
    if state.is_main_process:
        skipped, corrupt_rows, nonfinite_rows, fields = dict.fromkeys(SKIP_REASONS, 0), [], [], {}
        for shard in range(num_shards):
            metadata = read_shard_header(out / shard_name(shard))["metadata"]
            for reason, count in json.loads(metadata["skipped"]).items():
                skipped[reason] += count
            corrupt_rows += json.loads(metadata["corrupt_rows"])
            nonfinite_rows += json.loads(metadata.get("nonfinite_rows", "[]"))
            fields = fields or json.loads(metadata["fields"])
        if cfg.critique_source():
            fields = {**fields, "critique_source": cfg.critique_source()}
        manifest = write_manifest(out, {**fields, "dtype": cfg.dtype, "source_rows": len(pairs), "skipped": skipped,
                                        "corrupt_rows": corrupt_rows[:1000], "nonfinite_rows": nonfinite_rows[:1000]},
                                  [shard_name(s) for s in range(num_shards)])
    state.wait_for_everyone()
    state.destroy_process_group()  # the gloo/NCCL group ends here: left to interpreter exit it can abort a rank (SIGABRT)
    return manifest or json.loads((out / "manifest.json").read_text())


class OnlineTriplets(torch.utils.data.Dataset):
    """The triplets of `extract`, computed when indexed (for `trainer.train --online`): item i is the i-th
    non-tie pair, as the dict a FeatureStore item is (float32), or None when an image is unreadable."""

    def __init__(self, dataset: str, preset: str, guidance_mode: str, device: str, seed: int = 0,
                 mllm: str | None = None, quantization: str | None = None, limit: int | None = None,
                 tiny_root: str | Path | None = None, questions: str | None = None):
        self.pairs = PreferencePairs(dataset, limit=limit)
        self.rows = self.pairs.decided_rows()
        if not self.rows:
            raise ValueError(f"{dataset} has no pair that is not a tie")
        self.guidance_mode, self.seed = guidance_mode, seed
        self.extractor = FeatureExtractor(preset, device, mllm, quantization, tiny_root, questions=questions)
        self.manifest = self.extractor.store_fields(guidance_mode)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor] | None:
        row = self.rows[index]
        read = read_pair(self.pairs, row)
        if isinstance(read, str):
            logger.warning("row %d skipped: %s", row, read)
            return None
        caption, winner, loser, _ = read
        sample = self.extractor.triplet(caption, winner, loser, self.guidance_mode, self.seed + row)
        return {
            "image_w": sample.image_w,  # (Si, D)
            "image_l": sample.image_l,  # (Si, D)
            "guidance": sample.guidance,  # (Sg, Dg)
            "guidance_mask": torch.ones(sample.guidance.shape[0], dtype=torch.bool),  # (Sg,)
        }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_config(ExtractConfig, argv, description=__doc__.split("\n\n")[0], prog="python -m trainer.extract")
    try:
        manifest = extract(cfg)
    except (ValueError, FileNotFoundError, ImportError) as error:
        sys.exit(f"error: {error}")
    from accelerate import PartialState

    if PartialState().is_main_process:
        skipped = manifest["skipped"]
        print(
            f"{cfg.out}: {manifest['num_samples']} triplets from {manifest['source_rows']} rows "
            f"(skipped: {skipped['ties']} ties, {skipped['corrupt']} unreadable images, "
            f"{skipped['empty_caption']} empty captions, {skipped.get('nonfinite', 0)} non-finite features); "
            f"{manifest['bytes_per_sample'] / 1e6:.3f} MB per sample"
        )
        if manifest["corrupt_rows"]:
            print(f"unreadable rows: {manifest['corrupt_rows'][:20]}")
        if manifest.get("nonfinite_rows"):
            print(f"rows with non-finite features (not stored): {manifest['nonfinite_rows'][:20]}")


if __name__ == "__main__":
    main()
