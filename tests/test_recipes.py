"""The shipped experiments against docs/recipes.md, and every experiment and task composed with every
data group: the composition a user gets is the one the configs and the docs promise."""

import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from beit_lightning.cli import ConfigError, data_groups_of_kind, data_kind, validate_config

ROOT = Path(__file__).parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))
# the values a user must give for each data group (paths), so that the composition can be validated
DATA_PATHS = {"imagefolder": ["data.root=/data/imagenet"],
              "imagenet_shards": ["data.train_urls='/data/in1k/train/shard-{000000..000009}.tar'"],
              "ade20k": ["data.root=/data/ADEChallengeData2016"],
              "ade20k_shards": ["data.train_urls='/data/ade/train/shard-{000000..000009}.tar'"],
              "retrieval_folder": ["data.root=/data/sop_retrieval"]}
#: data groups of label maps (task=segmentation) and their DataModule classes; the others hold class labels
SEGMENTATION_DATA = {"generated_segmentation": "GeneratedSegmentationDataModule", "ade20k": "ADE20KDataModule",
                     "ade20k_shards": "SegmentationShardsDataModule"}
IMAGE_DATA = {"generated": "GeneratedDataModule", "imagefolder": "ImageFolderDataModule",
              "imagenet_shards": "ImageShardsDataModule"}
#: data groups of disjoint train/test classes (task=retrieval)
RETRIEVAL_DATA = {"generated_retrieval": "GeneratedRetrievalDataModule", "retrieval_folder": "RetrievalFolderDataModule"}
USER_PATHS = {"tokenizer.path", "tokenizer.checkpoint", "task.teacher", "task.teacher.checkpoint"}


def _compose(overrides):
    with initialize_config_module(config_module="beit_lightning.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def recipe_tables() -> dict[str, list[tuple[str, object, str]]]:
    """{experiment: [(key, value, source)]} from docs/recipes.md."""
    tables: dict[str, list] = {}
    current = None
    for line in (ROOT / "docs" / "recipes.md").read_text().splitlines():
        heading = re.match(r"## `experiment=(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), [])
            continue
        row = re.match(r"\| `([^`]+)` \| `([^`]*)` \| (.+) \|$", line)
        if row and current is not None:
            current.append((row.group(1), yaml.safe_load(row.group(2)), row.group(3)))
    return tables


TABLES = recipe_tables()


def _value(cfg, key):
    if key == "total_batch":
        return cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def test_every_paper_experiment_has_a_recipe_table():
    text = (ROOT / "docs" / "recipes.md").read_text()
    unofficial = set(re.findall(r"^- `experiment=(\w+)`", text, flags=re.M)) | {e for e in EXPERIMENTS if e.startswith("smoke")}
    assert sorted(TABLES) == sorted(set(EXPERIMENTS) - unofficial), "every other experiment needs a table in docs/recipes.md"
    assert all(len(rows) >= 10 and all(source.strip() for _, _, source in rows) for rows in TABLES.values())


@pytest.mark.parametrize("experiment", sorted(TABLES))
def test_experiment_equals_its_recipe_table(experiment):
    cfg = _compose([f"experiment={experiment}", "output_dir=/tmp/x"])
    wrong = [f"{key}: config {_value(cfg, key)!r}, table {value!r} ({source})"
             for key, value, source in TABLES[experiment]
             if not (_value(cfg, key) == value or (isinstance(value, float) and _value(cfg, key) == pytest.approx(value)))]
    assert not wrong, "\n".join(wrong)


def _assert_composes(cfg, data):
    try:
        validate_config(cfg)
    except ConfigError as err:  # only weights the user must give, or published weights not cached, may be missing
        problems = str(err).split("\n  - ")[1:]
        for problem in problems:
            if "required values unset" in problem:
                unset = set(problem.split("unset: ")[1].split(". Set")[0].split(", "))
                assert unset <= USER_PATHS, unset
            else:  # a registry name (no test downloads): offline and not in the test's empty cache
                key, _, rest = problem.partition("=")
                assert key in USER_PATHS and "not in the cache and BEIT_LIGHTNING_OFFLINE is set" in rest, problem
    # the DataModule of the group, and it accepts every key of the composed data config
    cls = get_class(cfg.data._target_)
    assert cls.__name__ == {**IMAGE_DATA, **SEGMENTATION_DATA, **RETRIEVAL_DATA}[data]
    instantiate(cfg.data)


def _kind(group: str, name: str) -> str:
    """The data kind a task needs or a data group serves (the ``data_kind`` of its ``_target_`` class)."""
    target = yaml.safe_load((CONF / group / f"{name}.yaml").read_text())
    target = target["task"]["_target_"] if group == "task" else target["_target_"]
    return data_kind(get_class(target))


def _compatible(task: str, data: str) -> bool:
    return _kind("task", task) == _kind("data", data)


def _assert_refused(overrides, task: str) -> None:
    """A task on the wrong kind of data: a clear error that names the data groups it can take."""
    groups = data_groups_of_kind(_kind("task", task))
    assert groups, task
    with pytest.raises(ConfigError, match=r"needs .* but the data group's \w+ serves .*: use one of " + re.escape(f"data={groups[0]}")):
        validate_config(_compose(overrides))


def test_data_groups_are_offered_by_kind():
    assert set(data_groups_of_kind("segmentation")) == set(SEGMENTATION_DATA)
    assert set(data_groups_of_kind("images")) == set(IMAGE_DATA)
    assert set(data_groups_of_kind("retrieval")) == set(RETRIEVAL_DATA)
    assert set(DATA) == {*IMAGE_DATA, *SEGMENTATION_DATA, *RETRIEVAL_DATA}


def _own_data_settings(path: Path) -> dict:
    """The `data:` block a task or experiment file sets itself."""
    return (yaml.safe_load(path.read_text()) or {}).get("data") or {}


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_on_every_data_group_and_keeps_its_data_settings(experiment, data):
    overrides = [f"experiment={experiment}", f"data={data}", *DATA_PATHS.get(data, []), "output_dir=/tmp/x"]
    if not _compatible(_task_of(experiment), data):
        _assert_refused(overrides, _task_of(experiment))
        return
    cfg = _compose(overrides)
    _assert_composes(cfg, data)
    task_file = CONF / "task" / f"{_task_of(experiment)}.yaml"
    for source in (task_file, CONF / "experiment" / f"{experiment}.yaml"):
        for key, value in _own_data_settings(source).items() if source.is_file() else []:
            if source.parent.name == "task" and key in _own_data_settings(CONF / "experiment" / f"{experiment}.yaml"):
                continue  # the experiment overrides its task
            if isinstance(value, str) and value.startswith("${"):  # an interpolation (e.g. smoke's bl.* resolvers)
                assert OmegaConf.to_container(cfg.data)[key] == value, (source.name, key)
                continue
            assert _value(cfg, f"data.{key}") == value, (source.name, key)


def _task_of(experiment: str) -> str:
    for line in (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines():
        found = re.match(r"\s*- override /task: (\w+)", line)
        if found:
            return found.group(1)
    return "pretrain"


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_keeps_its_data_settings_on_every_data_group(task, data):
    model = [] if data.startswith("generated") or task == "gan" else ["model=beit_base"]  # real data: 224px models
    if task == "segmentation" and data.startswith("generated"):
        model = ["model=beit_small"]  # the micro model has too few blocks for the four scales
    overrides = [f"task={task}", f"data={data}", *model, *DATA_PATHS.get(data, []), "output_dir=/tmp/x"]
    if not _compatible(task, data):
        _assert_refused(overrides, task)
        return
    cfg = _compose(overrides)
    _assert_composes(cfg, data)
    own = _own_data_settings(CONF / "task" / f"{task}.yaml")
    assert own or task in ("segmentation", "retrieval"), f"task {task} sets no data mode"  # their data groups serve one task
    for key, value in own.items():
        if isinstance(value, str) and value.startswith("${"):  # an interpolation (e.g. a bl.* resolver)
            assert OmegaConf.to_container(cfg.data)[key] == value, key
            continue
        assert _value(cfg, f"data.{key}") == value, key


def test_linear_probe_task_defaults_are_the_official_recipe():
    cfg = _compose(["task=linear_probe", "data=imagefolder", "data.root=/x", "output_dir=/tmp/x"])
    probe = {key: value for key, value, _ in TABLES["beit_base_linear_probe_in1k"]}
    for key in ("task.lr", "task.lr_base_batch", "task.min_lr", "task.warmup_epochs", "task.schedule_interval",
                "task.weight_decay", "task.init_std", "trainer.max_epochs", "data.train_interpolation", "data.scale",
                "data.auto_augment", "data.reprob", "data.color_jitter", "data.crop_pct", "data.mean"):
        assert _value(cfg, key) == probe[key], key


def _flat(cfg) -> dict:
    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node
    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))


@pytest.mark.parametrize("variant", ["beit_base_ade20k_pt2ft", "beit_base_ade20k_640_pt2ft"])
def test_segmentation_variants_differ_from_the_base_recipe_only_in_their_table(variant):
    """The variant tables list only what differs: everything else must be beit_base_ade20k's."""
    base = _flat(_compose(["experiment=beit_base_ade20k", "data.root=/x", "output_dir=/tmp/x"]))
    other = _flat(_compose([f"experiment={variant}", "data.root=/x", "output_dir=/tmp/x"]))
    listed = {key for key, _, _ in TABLES[variant]}
    differ = {k for k in base.keys() | other.keys() if base.get(k) != other.get(k)}
    assert differ <= listed, sorted(differ - listed)


MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_vitgan_models_and_task_gan_go_together_and_are_refused_elsewhere(task):
    """task=gan takes the ViTGAN model groups only, and they serve no other task: a clear error names the way out."""
    gan_models = [m for m in MODELS if m.startswith("vitgan")]
    assert gan_models
    data = "generated_segmentation" if task == "segmentation" else "generated_retrieval" if task == "retrieval" else "generated"
    for model in (["beit_micro", "vit_micro"] if task == "gan" else gan_models):
        overrides = [f"task={task}", f"model={model}", f"data={data}", "output_dir=/tmp/x"]
        with pytest.raises(ConfigError, match="task=gan"):
            validate_config(_compose(overrides))
