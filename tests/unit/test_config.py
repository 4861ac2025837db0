import json
from pathlib import Path

import pytest

from jsm_dist.config import Config, build_config, help_text, parse_cli


def test_defaults_validate():
    cfg = build_config()
    assert isinstance(cfg, Config)
    assert cfg.train.lr == pytest.approx(1e-4)


def test_cli_overrides_file_and_types(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"train": {"epochs": 3, "lr": 0.01}}))
    cfg, over = parse_cli(["--config", str(f), "--train.epochs", "5", "--tensorboard=false"])
    assert cfg.train.epochs == 5  # CLI wins over file
    assert cfg.train.lr == pytest.approx(0.01)  # file wins over default
    assert cfg.train.tensorboard is False
    assert over == {"train.epochs": "5", "tensorboard": "false"}


def test_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  tau: 3\n")
    cfg, _ = parse_cli(["--config", str(f)])
    assert cfg.train.tau == 3


def test_bare_flag_sets_bool():
    cfg, _ = parse_cli(["--refine_before_training"])
    assert cfg.train.refine_before_training is True


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--train.epochs", "0"], "train.epochs=0"),
        (["--epochz", "3"], "unknown setting 'epochz'"),
        (["--train.lr", "fast"], "train.lr='fast'"),
        (["--train.lr_schedule", "linear"], "lr_schedule"),
        (["--tensorboard", "maybe"], "true/false"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_settings_name_key_and_value(argv, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_cli(argv)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError):
        parse_cli(["--config", "/nonexistent/x.json"])


def test_help_lists_every_section():
    text = help_text()
    for sec in ("[train]", "[data]", "[model]"):
        assert sec in text
    assert "--train.tau" in text


def test_config_round_trip(tmp_path):
    cfg, _ = parse_cli(["--train.epochs", "2"])
    cfg.save(tmp_path / "config.json")
    again = build_config(json.loads((tmp_path / "config.json").read_text()))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("mode", ["weak", "unsupervised"])
def test_text_lr_gives_the_text_network_its_own_group(mode):
    from jsm_dist.models import JSMModel
    from jsm_dist.train import build_optimizer

    cfg, _ = parse_cli(
        ["--train.lr", "1e-4", "--train.text_lr", "2e-3", "--train.decoder_lr_mult", "10",
         "--model.encoder", "tiny",
         "--model.mode", mode, "--model.text_hidden", "32", "--model.text_layers", "1"]
    )  # fmt: skip
    model = JSMModel(cfg.model, ["<negative>", "cat", "dog"])
    opt, _ = build_optimizer(cfg, model, total_samples=80)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs.pop("text", None) == (pytest.approx(2e-3) if mode == "weak" else None)
    # the decoders at lr x train.decoder_lr_mult (10 here), the rest at lr
    decoders = {k: lrs.pop(k) for k in ("saliency_decoder", "depth_decoder")}
    assert all(v == pytest.approx(1e-3) for v in decoders.values())
    assert lrs and all(v == pytest.approx(1e-4) for v in lrs.values())
    cfg.train.text_lr = 0.0  # 0 = same as lr
    cfg.train.decoder_lr_mult = 1.0  # 1 = one rate (reference): no decoder groups
    opt, _ = build_optimizer(cfg, model, total_samples=80)
    assert all(g["lr"] == pytest.approx(1e-4) for g in opt.param_groups)
    assert not any(g["name"].endswith("_decoder") for g in opt.param_groups)


def test_negative_text_lr_is_refused():
    with pytest.raises(ValueError, match="text_lr"):
        parse_cli(["--train.text_lr", "-1"])


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[2] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_resolve(path):
    """Every file in configs/ loads (no unknown key or bad value) and every value it sets is
    the one the run gets (launch/demo.sh trains with configs/demo.yaml)."""
    import yaml

    cfg, _ = parse_cli(["--config", str(path)])
    resolved = cfg.to_dict()
    for section, values in yaml.safe_load(path.read_text()).items():
        for key, value in values.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"


def test_every_setting_is_declared_with_help_and_listed_by_help():
    """One declaration per setting: each field carries its help; --help prints all of them."""
    import dataclasses

    from jsm_dist.config import _section_types
    from jsm_dist.settings import help_of

    text = help_text()
    for sec, cls in _section_types().items():
        for f in dataclasses.fields(cls):
            assert help_of(f).strip(), f"{sec}.{f.name} has no help"
            assert f"--{sec}.{f.name} = " in text, f"{sec}.{f.name} missing from --help"
            assert help_of(f)[:40] in " ".join(text.split()), f"{sec}.{f.name}: help not printed"


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--train.warmup_steps", "-1"], "train.warmup_steps=-1"),
        (["--train.weight_decay", "-0.1"], "train.weight_decay=-0.1"),
        (["--train.init_generation", "-1"], "train.init_generation=-1"),
        (["--train.label_eval_max", "-5"], "train.label_eval_max=-5"),
        (["--train.image_grid_samples", "-1"], "train.image_grid_samples=-1"),
        (["--train.max_steps_per_epoch", "-2"], "train.max_steps_per_epoch=-2"),
        (["--model.mode", "semi"], "model.mode='semi'"),
        (["--data.start_method", "thread"], "data.start_method='thread'"),
        (["--data.crop", "1.5"], "data.crop=1.5"),
    ],
)
def test_every_setting_is_checked(argv, msg):
    with pytest.raises(ValueError, match=msg):
        parse_cli(argv)


def test_pack_options_come_from_pack_config():
    """jsm-pack's parser restates nothing: every option's default and help is PackConfig's."""
    import dataclasses

    from jsm_dist.data.pack import PackConfig, build_parser
    from jsm_dist.settings import default_of, help_of

    args = build_parser().parse_args(["synth", "--out", "x"])
    for f in dataclasses.fields(PackConfig):
        if f.name in ("source", "out", "input"):
            continue
        assert help_of(f).strip(), f"pack.{f.name} has no help"
        assert getattr(args, f.name) == default_of(f), f.name
    cfg = PackConfig(**vars(args))
    assert cfg.source == "synth" and cfg.out == "x"
