"""The `prepare` stage's work: turn a raw dataset into the prepared splits and manifest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.config.params import BUILT_IN_FORMATS, DataConfig, IncrementalConfig
from pipeline.data import digit_scenes, formats, shape_scenes
from pipeline.data.atomic import staged
from pipeline.data.incremental import (
    StepClasses,
    present_classes,
    read_tags,
    step_classes,
    step_mask,
    step_tags,
    steps_of,
)
from pipeline.data.manifest import (
    ALL_CLASSES_VAL,
    MANIFEST,
    SEGMENTATION_SPLITS,
    STEPS_FOLDER,
    SplitWriter,
    nested_labeled_ids,
    step_split,
    write_prepared,
)
from pipeline.data.shards import DataError


class Router:
    """Writes a dataset of `classes` into the splits under `tmp`, example by example. With
    incremental steps, masks are remapped to the setting's class order (`step_classes`), and a
    train image goes to the steps its protocol gives it: to its split (labeled or unlabeled) with
    step 0's view of its mask, and to a later step's `steps/<name>` with its tags (the step's
    classes it shows, read off its mask or, for an image with none, the user's tags.csv) and the
    step's view of its mask held aside. Val images go to val with step 0's view, and to val_all
    whole. The manifest's classes, and so the models' heads, are then step 0's."""

    def __init__(self, classes: list[str], incremental: IncrementalConfig, tmp: Path, shard_rows: int):
        self.classes, self.protocol, self.step_names = classes, incremental.protocol, list(incremental.steps)
        self.setting: StepClasses | None = None
        if incremental.steps:
            self.setting = step_classes(classes, {name: step.classes for name, step in incremental.steps.items()})
            self.classes = self.setting.names[:1 + len(self.setting.steps[0])]
        self.writer = SplitWriter(len(self.classes), tmp, shard_rows, self.step_names)

    def add(self, split: str, eid: str, image, mask, tags: list[int] = ()) -> None:
        setting, writer = self.setting, self.writer
        if setting is None:
            writer.add(split, eid, image, mask)
            return
        mask = None if mask is None else setting.remap(mask)
        if split == "val":
            writer.add("val", eid, image, step_mask(mask, setting.steps, 0))
            writer.add(ALL_CLASSES_VAL, eid, image, mask)
            return
        if mask is None and not tags:  # an untagged image without a mask: step 0's to learn from unlabeled
            writer.add(split, eid, image, None)
            return
        present = frozenset(int(setting.table[c]) for c in tags) if mask is None else present_classes(mask)
        steps = steps_of(present, setting.steps, self.protocol)
        writer.unassigned += not steps
        for step in steps:
            view = None if mask is None else step_mask(mask, setting.steps, step)
            if step == 0:
                writer.add(split, eid, image, view)
            else:
                writer.add(step_split(self.step_names[step - 1]), eid, image, view, step_tags(present, setting.steps, step))

    def close(self, cfg: DataConfig, tmp: Path) -> dict:
        """Close the splits and write the manifest; return it."""
        incremental = None
        if self.setting is not None:
            names = self.setting.names
            incremental = {"protocol": self.protocol, "classes": names,
                           "base": [names[c] for c in self.setting.steps[0]],
                           "steps": {step: {"classes": [names[c] for c in ids]}
                                     for step, ids in zip(self.step_names, self.setting.steps[1:])}}
        return write_prepared(self.writer, self.classes, cfg, tmp, incremental)


def prepare_generated(cfg: DataConfig, out_dir: Path, classes: list[str], examples,
                      incremental: IncrementalConfig) -> dict:
    """A built-in dataset from its generator's (split, id, image, mask) examples: train scenes
    split into labeled and unlabeled, and val scenes."""
    examples = list(examples)
    train_ids = [eid for split, eid, _, _ in examples if split == "train"]
    labeled = set(nested_labeled_ids(train_ids, cfg.labeled_fraction, cfg.seed))
    with staged(out_dir) as tmp:
        router = Router(classes, incremental, tmp, cfg.shard_rows)
        for split, eid, image, mask in examples:
            router.add("val" if split == "val" else ("labeled" if eid in labeled else "unlabeled"), eid, image, mask)
        return router.close(cfg, tmp)


def generated_examples(cfg: DataConfig) -> tuple[list[str], Iterator]:
    """The classes and examples of a built-in dataset."""
    if cfg.format == "digits":
        return digit_scenes.CLASSES, digit_scenes.generate(cfg.seed, cfg.image_size, cfg.digits, cfg.tuning)
    return shape_scenes.CLASSES, shape_scenes.generate(cfg.seed, cfg.image_size, cfg.shapes, cfg.tuning)


def choose_labeled(train: list[formats.Example], cfg: DataConfig) -> set[str]:
    """Ids of the train images that keep their masks: those listed in `data.labeled_ids`
    (an id, or an image path whose stem names the image, per line), else a nested seeded
    `data.labeled_fraction`."""
    if not cfg.labeled_ids:
        return set(nested_labeled_ids([ex.id for ex in train], cfg.labeled_fraction, cfg.seed))
    path = Path(cfg.labeled_ids)
    by_name = {name: ex.id for ex in train for name in (ex.id, ex.image.stem)}
    listed = formats.read_id_list(path)
    unknown = [name for name in listed if name not in by_name]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} listed ids are not train images of data.root "
                        f"(first: {', '.join(unknown[:3])})")
    if not listed:
        raise DataError(f"{path}: lists no image; expected the labeled image ids, one per line")
    return {by_name[name] for name in listed}


def prepare_files(cfg: DataConfig, out_dir: Path, incremental: IncrementalConfig) -> dict:
    """A dataset on disk in one of the `pipeline.data.formats` layouts."""
    fmt = formats.get_format(cfg.format)
    root = Path(cfg.root)
    classes = list(fmt.classes(root))
    table = fmt.label_table(len(classes))
    examples = fmt.list_examples(root, cfg)
    labeled = choose_labeled([ex for ex in examples if ex.split == "train"], cfg)
    with staged(out_dir) as tmp:
        router = Router(classes, incremental, tmp, cfg.shard_rows)  # the steps' classes checked first
        tags = folder_tags(root, classes, examples, incremental) if cfg.format == "folder" else {}
        for example in examples:
            split = {"train": "labeled" if example.id in labeled else "unlabeled"}.get(example.split, example.split)
            for eid, image, mask in formats.load_example(example, fmt, table, cfg):
                router.add(split, eid, image, mask, tags.get(example.id, ()))
        return router.close(cfg, tmp)


def folder_tags(root: Path, classes: list[str], examples: list[formats.Example],
                incremental: IncrementalConfig) -> dict[str, list[int]]:
    """Example id -> the dataset class ids of its tags (`root/tags.csv`, rows for images of
    `root/unlabeled`), read when there are incremental steps; their images have no masks."""
    if not incremental.steps:
        return {}
    by_stem = {ex.image.stem: ex.id for ex in examples if ex.split == "unlabeled"}
    tagged = read_tags(root / "tags.csv", classes, by_stem)
    return {by_stem[stem]: [classes.index(name) for name in names] for stem, names in tagged.items()}


# What an earlier output of `prepare` holds (`classify`: of versions that trained the supervised
# encoder in the pipeline), and the keys its manifest has (`write_prepared`).
OUTPUT_ENTRIES = {MANIFEST, "classify", *SEGMENTATION_SPLITS, STEPS_FOLDER, ALL_CLASSES_VAL}
MANIFEST_KEYS = {"classes", "num_classes", "counts", "ids"}
REPLACED = "it would be replaced whole"


def check_output(cfg: DataConfig, out_dir: Path) -> None:
    """Refuse an output whose replacement would destroy anything but an earlier output of
    `prepare`: the dataset itself, a folder inside it or holding it (symlinks resolved), an
    existing file, or a folder of other files. A new path, an empty folder and an earlier
    output (its manifest.json with the manifest's keys, nothing beside it but the splits) are
    fine."""
    out = Path(out_dir).resolve()
    named = str(out_dir) if out == Path(out_dir).absolute() else f"{out_dir} (= {out})"
    if cfg.root:
        root = Path(cfg.root).resolve()
        where = ("is data.root itself" if out == root else "lies inside data.root" if root in out.parents
                 else "holds data.root" if out in root.parents else None)
        if where:
            raise DataError(f"{named}: prepare's output {where} ({cfg.root}); {REPLACED}, so expected a "
                            "folder outside the dataset, e.g. data/prepared")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{named}: exists and is not a folder; {REPLACED}, so expected a new path, an empty "
                        "folder or an earlier output of prepare")
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}  # .DS_Store and the like
    if not entries:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    others = sorted(entries - OUTPUT_ENTRIES)
    if not isinstance(manifest, dict) or not MANIFEST_KEYS <= manifest.keys() or others:
        found = (f"it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}" if others
                 else f"its {MANIFEST} is not one prepare writes" if (out / MANIFEST).exists()
                 else f"no {MANIFEST}")
        raise DataError(f"{named}: exists and is not an earlier output of prepare ({found}); {REPLACED}, so "
                        "expected a new path, an empty folder or an earlier output of prepare")


def prepare(cfg: DataConfig, out_dir: Path, incremental: IncrementalConfig | None = None) -> dict:
    """Write the prepared splits for `cfg.format` to `out_dir`, step 0's view of them and the
    later steps' tagged images when `incremental` has steps; return the manifest."""
    incremental = incremental or IncrementalConfig()
    check_output(cfg, out_dir)
    if cfg.format in BUILT_IN_FORMATS:
        return prepare_generated(cfg, out_dir, *generated_examples(cfg), incremental)
    return prepare_files(cfg, out_dir, incremental)


def labeled_subset(prepared: Path, fraction: float, seed: int, out_dir: Path, shard_rows: int,
                   unlabeled_dir: Path | None = None) -> tuple[int, int]:
    """Write a labeled split of `fraction` of the train images that have masks (labeled and
    unlabeled splits together), chosen by `seed`; nested across fractions for one seed. With
    `unlabeled_dir`, also write the other train images there, masks kept aside (pseudo-labels
    are scored against them, never trained on). Returns (labeled, unlabeled) image counts.
    Label-efficiency studies train on these."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.data.shards import SEGMENTATION_SCHEMA, read_split, write_shards

    pool = pa.concat_tables([read_split(prepared / split) for split in ("labeled", "unlabeled")
                             if any((prepared / split).glob("*.parquet"))])
    pool = pool.filter(pc.is_valid(pool.column("mask"))).sort_by("id")
    chosen = pc.is_in(pool.column("id"), pa.array(sorted(nested_labeled_ids(pool.column("id").to_pylist(), fraction, seed))))
    counts = []
    for table, split_dir in ((pool.filter(chosen), out_dir), (pool.filter(pc.invert(chosen)), unlabeled_dir)):
        if split_dir is None:
            continue
        with staged(split_dir) as tmp:
            counts.append(write_shards(table.cast(SEGMENTATION_SCHEMA).to_pylist(), SEGMENTATION_SCHEMA, tmp, shard_rows))
    return counts[0], counts[1] if len(counts) > 1 else 0
