"""TFDS array_record datasets without TensorFlow: read via `tfds.data_source`, write local corpora.

Reading: 'tfds:NAME[/CONFIG][:VERSION]' -> `tfds.data_source(..., builder_kwargs=dict(
file_format='array_record'))` under config.data.data_dir ('' = $TFDS_DATA_DIR or
~/tensorflow_datasets). Nothing is downloaded here: an unprepared dataset raises an error that says
how to prepare it. Writing: `write_tfds_dataset` stores records via TFDS's adhoc builder, patched in
the places that would import TensorFlow / importlib_resources (checked with tfds 4.9.10).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from solo.data.sources import SourceError, heldout_split

if TYPE_CHECKING:
    from solo.data.config import DataConfig

_FIELDS = {"documents": ("text",), "pairs": ("text_a", "text_b"), "seq2seq": ("source", "target")}


def _data_dir(d: Any) -> str | None:
    """data.data_dir, else $TFDS_DATA_DIR, else None (TFDS's default); d may be None."""
    return (d.data_dir if d is not None else "") or os.environ.get("TFDS_DATA_DIR") or None


def _prepare_help(name: str, data_dir: str | None, why: str) -> str:
    where = data_dir or "~/tensorflow_datasets (default; set config.data.data_dir or TFDS_DATA_DIR)"
    return (
        f"TFDS dataset {name!r} is not available under {where}: {why}\n"
        "Prepare it once as array_record (TensorFlow is not needed to read it):\n"
        f"  on a machine with internet: `tfds build {name.split(':')[0]} "
        "--file_format=array_record "
        "--data_dir=DIR`, then copy DIR/<name>/ to this machine's data_dir;\n"
        "  datasets with manual downloads: put the files in DIR/downloads/manual (or pass "
        "--manual_dir=...) before `tfds build`;\n"
        "  a local corpus: data.tfds_io.write_tfds_dataset(records, name, data_dir).\n"
        "Then set config.data.data_dir=DIR (or export TFDS_DATA_DIR=DIR)."
    )


def tfds_source(name: str, split: str, data_dir: str | None):
    """Random-access array_record source for one split; raises SourceError with preparation help."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # unknown name, missing files, unparsable version
        raise SourceError(_prepare_help(name, data_dir, f"{type(e).__name__}: {e}")) from None
    if not builder.is_prepared():
        raise SourceError(_prepare_help(name, data_dir, f"not prepared in {builder.data_dir}"))
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            builder_kwargs=dict(file_format="array_record"),
        )
    except Exception as e:  # e.g. prepared as tfrecord only
        raise SourceError(_prepare_help(name, data_dir, f"{type(e).__name__}: {e}")) from None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_tfds(name: str, d: DataConfig, kind: str, split: str) -> list[dict]:
    """Materialise one split as records. Without a 'validation' split, hold out data.val_fraction
    of 'train' deterministically (data.split_mode)."""
    import tensorflow_datasets as tfds

    data_dir = _data_dir(d)
    try:
        splits = set(
            tfds.builder(name, data_dir=data_dir, file_format="array_record").info.splits.keys()
        )
    except Exception as e:
        raise SourceError(_prepare_help(name, data_dir, f"{type(e).__name__}: {e}")) from None
    derive = split not in splits and split == "validation" and "train" in splits
    if split not in splits and not derive:
        raise SourceError(f"tfds:{name} has no split {split!r} (has {sorted(splits)})")
    src = tfds_source(name, "train" if derive else split, data_dir)
    text_field = d.text_field
    records = []
    for i in range(len(src)):
        ex = src[i]
        if kind == "documents":
            if text_field not in ex:
                raise SourceError(
                    f"tfds:{name}[{split}] example {i}: no feature {text_field!r} "
                    f"(has {sorted(ex)}); set data.text_field"
                )
            records.append({"text": _text(ex[text_field])})
        elif kind == "chats":
            p, r = d.prompt_field, d.response_field
            if p not in ex or r not in ex:
                raise SourceError(
                    f"tfds:{name}: chats need data.prompt_field/response_field "
                    f"features (has {sorted(ex)})"
                )
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": _text(ex[p])},
                        {"role": "assistant", "content": _text(ex[r])},
                    ]
                }
            )
        else:
            fields = _FIELDS[kind]
            if kind == "pairs" and "text_a" not in ex and text_field in ex:
                t = _text(ex[text_field])
                records.append({"text_a": t, "text_b": t})
                continue
            missing = [f for f in fields if f not in ex]
            if missing:
                raise SourceError(f"tfds:{name} example {i}: missing features {missing}")
            records.append({f: _text(ex[f]) for f in fields})
    if derive or ("validation" not in splits and split == "train"):
        records = heldout_split(records, split, d.val_fraction, d.split_mode)
    return records


def write_tfds_dataset(
    records: Mapping[str, Iterable[dict]] | Iterable[dict],
    name: str,
    data_dir: str,
    *,
    config_name: str | None = None,
    version: str = "1.0.0",
    val_fraction: float = 0.1,
    split_mode: str = "random",
    overwrite: bool = False,
) -> str:
    """Write string-valued records as TFDS array_record `name` under data_dir; returns its path.

    `records` is {split: records} or a flat list (then split into train/validation by val_fraction).
    All records must share the same string fields. Read back with source 'tfds:NAME' + data_dir.
    Record order is preserved (shuffling disabled), so a 'tail' split stays contiguous.
    """
    import shutil

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.dataset_builders import adhoc_builder

    if not isinstance(records, Mapping):
        recs = list(records)
        records = {
            s: heldout_split(recs, s, val_fraction, split_mode) for s in ("train", "validation")
        }
    splits = {s: list(r) for s, r in records.items() if len(list(r))}
    if not splits:
        raise ValueError("write_tfds_dataset: no records")
    keys = sorted(next(iter(splits.values()))[0])
    for s, recs in splits.items():
        for i, r in enumerate(recs):
            if sorted(r) != keys or not all(isinstance(r[k], str) for k in keys):
                raise ValueError(
                    f"split {s!r} record {i}: expected string fields {keys}, got {r!r}"
                )

    class _Builder(adhoc_builder.AdhocBuilder, skip_registration=True):
        code_path = None  # the classproperty needs importlib_resources
        url_infos = None

        def _split_generators(self, dl_manager):  # the base checks isinstance(tf.data.Dataset)
            del dl_manager
            return {s: self._generate_examples_iterator(v) for s, v in self._split_datasets.items()}

    builder = _Builder(
        name=name,
        version=version,
        config=config_name,
        data_dir=data_dir,
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in keys}),
        split_datasets={s: [(i, r) for i, r in enumerate(v)] for s, v in splits.items()},
        disable_shuffling=True,
        description="Local corpus written by solo data.tfds_io.",
    )
    if builder.is_prepared():
        if not overwrite:
            return str(builder.data_dir)
        shutil.rmtree(builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)
