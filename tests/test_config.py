"""Config: YAML onto dataclasses, overrides, and errors that name the full key path."""

import os
import re
import sys
from pathlib import Path

import pytest

from distsent.config import ConfigError

from distsent.configfile import config_from_dict, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.output_dir == f"runs/{path.stem}"  # each config writes to a run directory named after it
    assert config_from_dict(cfg.to_dict()) == cfg  # and survives the save/load of a run folder


def test_seed_hyperparameters_in_imdb_lstm():
    cfg = load_config(Path(CONFIGS[0]).parent / "imdb_lstm.yaml")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.embedding_dim, m.hidden_dim, m.num_layers, m.dropout, m.cell, m.bidirectional) == (128, 256, 2, 0.5,
                                                                                                  "lstm", False)
    assert (d.min_freq, d.max_len, o.name, o.lr, t.global_batch_size, o.clip_grad_norm, t.epochs) == (
        5, 256, "adam", 1e-3, 64, 5.0, 8)  # lr: the peak of a warmup + cosine schedule (tutorial: constant, 5 epochs)


def test_overrides_typed_and_nested():
    cfg = load_config(None, ["model.hidden_dim=64", "optim.lr=3e-4", "log.wandb.tags=[a, b]", "data.path=/x/y",
                             "train.flush_denormal=false"])
    assert cfg.model.hidden_dim == 64 and cfg.optim.lr == 3e-4 and cfg.log.wandb.tags == ["a", "b"]
    assert cfg.data.path == "/x/y" and cfg.train.flush_denormal is False


def test_a_section_override_sets_its_keys_and_a_key_given_twice_is_refused(tmp_path):
    """`train={epochs: 2}` changes that key of the file's section, not the whole section (which dropped the file's
    other train keys); a YAML key given twice (a second `train:` block appended to a file) is refused, naming the
    lines: YAML keeps the last, and every key of the first block was silently lost."""
    cfg = load_config(CONFIGS[0].parent / "emotion.yaml", ["train={epochs: 2}"])
    assert (cfg.train.epochs, cfg.train.global_batch_size, cfg.train.label_smoothing) == (2, 32, 0.1)
    p = tmp_path / "twice.yaml"
    p.write_text("train:\n  epochs: 3\n  global_batch_size: 16\nmodel:\n  hidden_dim: 8\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: train: given twice \(lines 1 and 6\)"):
        load_config(p)
    p.write_text("log:\n  wandb:\n    tags: [a]\n    mode: offline\n    tags: [b]\n")  # named with its section
    with pytest.raises(ConfigError, match=r"twice.yaml: log.wandb.tags: given twice \(lines 3 and 5\)"):
        load_config(p)
    p.write_text("train:\n  ? [epochs]\n  : 3\n")  # a list as a key: YAML's own error, not a traceback
    with pytest.raises(ConfigError, match="(?s)twice.yaml: not valid YAML: .*found unhashable key"):
        load_config(p)
    # a bad key of the file's section is still the file's, not the section override's; YAML merge keys still load
    p.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"^\S*twice.yaml: train.epochs: must be >= 1"):
        load_config(p, ["train={seed: 1}"])
    p.write_text("model: &m\n  hidden_dim: 8\nlog:\n  wandb:\n    <<: {project: x}\n    tags: [a]\n")
    assert load_config(p).log.wandb.project == "x"


def test_the_emotion_config_without_a_path_reads_the_emotion_data_set_not_imdb(monkeypatch):
    """configs/emotion.yaml without data.path once fell back to the hub default, IMDB: a six-class recipe trained on
    two classes without a word of warning. It names the emotion data set and its validation split."""
    from distsent.sources import DATA_PATH_ENV, Source, find_source

    monkeypatch.delenv(DATA_PATH_ENV, raising=False)
    data = load_config(CONFIGS[0].parent / "emotion.yaml").data
    assert find_source(data) == Source("hub", "dair-ai/emotion") and data.hub_validation_split == "validation"


def test_numbers_in_string_fields_keep_their_text():
    """YAML 1.1 reads 010 as 8 (octal) and 1:30 as 90: class names such as product codes 007 / 010 became 7 / 8
    and then matched no label in the data."""
    cfg = load_config(None, ["data.label_names=[007, 010, 1.50]", "output_dir=1:30", "model.hidden_dim=12"])
    assert cfg.data.label_names == ["007", "010", "1.50"] and cfg.output_dir == "1:30"
    assert type(cfg.model.hidden_dim) is int  # plain numbers where numbers are meant (safe_dump writes them)
    # numbers and dates as YAML 1.2 reads them: 010 is ten, 1:30 no integer, a date a string
    assert load_config(None, ["log.wandb.notes='lr sweep #3'"]).log.wandb.notes == "lr sweep #3"  # quoted: kept
    assert load_config(None, ["log.wandb.notes=C#", "train.max_steps=100_000"]).train.max_steps == 100000
    cfg = load_config(None, ["train.seed=010", "data.path=2024-01-01", "log.wandb.name=2024-01-01", "optim.lr=3e-4"])
    assert (cfg.train.seed, cfg.data.path, cfg.log.wandb.name, cfg.optim.lr) == (10, "2024-01-01", "2024-01-01", 3e-4)
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer, got str '1:30'"):
        load_config(None, ["train.max_steps=1:30"])


def test_output_dir_under_home_is_expanded(tmp_path, monkeypatch):
    """A quoted or YAML ~ is not expanded by the shell: the run directory must not be a folder named ~ here."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, ["output_dir=~/runs/x"]).output_dir == str(tmp_path / "runs" / "x")


def test_int_accepted_for_float():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("model.hiden_dim=3", "model.hiden_dim: unknown key; did you mean model.hidden_dim?"),
    ("log.wandb.projekt=x", "log.wandb.projekt: unknown key"),
    ("model.hidden_dim=abc", "model.hidden_dim: expected an integer"),
    ("model.hidden_dim=1.5", "model.hidden_dim: expected an integer, got float 1.5"),  # not _Float
    ("data.label_names=[false, true]", "data.label_names[0]: expected a string, got bool False; quote a name that"),
    ("train.flush_denormal=maybe", "train.flush_denormal: expected true or false"),
    ("model.pooling=first", "model.pooling: must be one of"),
    ("log.wandb.tags=x", "log.wandb.tags: expected a list"),
    ("model=3", "model: expected a mapping of ModelConfig keys, got int 3"),
    ("model.ngram_max_n=5", "model.ngram_max_n: must be in"),
    ("model.ngram_weight=-1", "model.ngram_weight: must be >= 0"),
    ("novalue", "expected key.sub=value"),
    # values that once passed and then trained wrongly or failed later with a traceback
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm: must be >= 0"),  # each step climbed the loss
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio: must be in [0.0, 1.0]"),
    ("optim.weight_decay=-0.01", "optim.weight_decay: must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0.0, 1.0"),
    ("optim.lr=.nan", "optim.lr: must be a finite number"),
    ("train.ema_decay=.nan", "train.ema_decay: must be a finite number"),
    ("dist.stop_signals=[SIGKILL]", "dist.stop_signals: SIGKILL cannot be caught"),
    ("dist.stop_signals=[SIG_DFL]", "dist.stop_signals: unknown signal 'SIG_DFL'"),
    ("output_dir=", "output_dir: empty"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295]"),  # numpy's range: a traceback after data prep
    ("data.split_seed=-1", "data.split_seed: must be >= 0"),
    ("model.forget_bias=.nan", "model.forget_bias: must be a finite number"),  # stopped at step 1 as a bad lr
    ("train={a: 1, a: 2}", "train: cannot read value '{a: 1, a: 2}': a: given twice"),
    ("log.wandb.notes=lr sweep #3", "log.wandb.notes: the value 'lr sweep #3' holds a # that YAML takes for a comment"),
    ("data.path=#x", "data.path: the value '#x' holds a #"),  # read as empty: the default data set
    ("log.wandb.notes=C# port #2", "log.wandb.notes: the value 'C# port #2' holds a #"),  # one # kept, one cut
    ("train={seeed: 4, 1: 3}", "train.1: unknown key"),  # unknown keys of two types: sorted, not a TypeError
    ("optim.lr=1" + "0" * 400, "optim.lr: the integer is too large for a number"),  # no OverflowError
    # an empty column or split name (an unset shell variable): "" read a CSV's unnamed index column as the texts
    ("data.text_column=", "data.text_column: empty; name the text column"),
    ("data.label_column= ", "data.label_column: empty"),
    ("data.hub_test_split=", "data.hub_test_split: empty; name the test split"),  # a KeyError traceback
    # sizes past what numpy, torch or datetime take: tracebacks (OverflowError, TypeError) after --check said OK
    ("data.max_len=100000000000000000000", "data.max_len: 100000000000000000000 is out of range"),
    ("dist.timeout_s=100000000000000", "dist.timeout_s: must be in [1, 100000000]"),
    ("train.threads=3000000000", "train.threads: must be in [0, 4096]"),
    ("model.hidden_dim=100000000000000000000", "model.hidden_dim: 100000000000000000000 is out of range"),
    ("model.embedding_dim=10000000000", "model.embedding_dim: must be in [1, 65536]"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_a_section_whose_keys_are_all_commented_out_is_empty(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  # epochs: 3\nmodel:\n  hidden_dim: 16\n")
    assert load_config(tmp_path / "c.yaml").train == load_config(None).train
    assert load_config(tmp_path / "c.yaml", ["train.epochs=7"]).train.epochs == 7


def test_a_config_file_without_output_dir_runs_in_a_folder_named_after_it(tmp_path):
    (tmp_path / "tickets.yaml").write_text("train:\n  epochs: 2\n")
    assert load_config(tmp_path / "tickets.yaml").output_dir == "runs/tickets"  # not the default IMDB run's folder
    assert load_config(tmp_path / "tickets.yaml", ["output_dir=runs/t2"]).output_dir == "runs/t2"
    assert load_config(None).output_dir == "runs/imdb_lstm"  # no file: the defaults are the IMDB run's


def test_bad_yaml_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  hidden_dim: 12\n  layers: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: model.layers: unknown key"):
        load_config(p)
    # a bad value given on the command line is blamed on the override, not on the file beside it
    p.write_text("model:\n  hidden_dim: 12\n")
    for override, message in (("train.epochs=two", "the override train.epochs=two: train.epochs: expected an integer"),
                              ("model.hidden_dim=0", "the override model.hidden_dim=0: model.hidden_dim: must be in "),
                              ("model.layers=3", "the override model.layers=3: model.layers: unknown key"),
                              ("trian.epochs=2", "the override trian.epochs=2: trian: unknown key")):
        with pytest.raises(ConfigError) as info:
            load_config(p, [override])
        assert str(info.value).startswith(message) and "bad.yaml" not in str(info.value), info.value
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("train: 3\n")  # the override cannot reach into it: both named
    with pytest.raises(ConfigError, match=r"the override train.epochs=3: train: is not a section, cannot set "
                                          r"train.epochs \(in .*bad.yaml\)"):
        load_config(p, ["train.epochs=3"])
    # a file that cannot be read as text: one line naming it, not a traceback
    p.write_bytes(b"output_dir: caf\xe9\n")  # Latin-1
    with pytest.raises(ConfigError, match=r"bad.yaml: not UTF-8 text \(byte 0xe9 at offset 15\); save it as UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match="is a folder; name a YAML file"):
        load_config(tmp_path)
    read, write = os.pipe()  # --config <(...): a pipe is a file to read too
    os.write(write, b"train:\n  epochs: 3\n")
    os.close(write)
    assert load_config(f"/dev/fd/{read}").train.epochs == 3
    os.close(read)  # as a process a launcher starts sees the launcher's pipe: not at all
    pipe = f"config file /dev/fd/{read} does not exist (a pipe, --config <(...), that this process was not given"
    with pytest.raises(ConfigError, match=re.escape(pipe)):
        load_config(f"/dev/fd/{read}")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.hidden_dim=7", "log.wandb.tags=[t]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_configs_saved_with_the_old_ngram_bag_key_still_load(tmp_path):
    """Run folders of earlier versions hold model.ngram_dim (mostly 0) beside ngram_max_n: 2."""
    old = tmp_path / "config.yaml"
    old.write_text("model:\n  ngram_dim: 0\n  ngram_max_n: 2\n  hidden_dim: 16\n")
    cfg = load_config(old)
    assert cfg.model.ngram_max_n == 0 and cfg.model.hidden_dim == 16  # no n-gram head, as it was trained
    assert load_config(old, ["model.ngram_max_n=2"]).model.ngram_max_n == 2  # the command line still wins
    old.write_text("model:\n  ngram_dim: 8\n  ngram_max_n: 3\n")
    with pytest.raises(ConfigError, match=r"config.yaml: model.ngram_dim: this model was trained with the fastText"):
        load_config(old)


def test_yaml_11_words_keep_their_string_meaning_and_still_set_booleans(tmp_path):
    """`no` is a documented value of train.mixed_precision; YAML 1.1 would read it as false."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\ndata:\n  strip_html: yes\n  lowercase: off\n"
                 "log:\n  wandb:\n    name: on\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.log.wandb.name == "on"
    assert cfg.data.strip_html is True and cfg.data.lowercase is False
    assert load_config(None, ["train.flush_denormal=n"]).train.flush_denormal is False
    with pytest.raises(ConfigError, match="train.flush_denormal: expected true or false"):
        load_config(None, ["train.flush_denormal=maybe"])
    # quoted, as a quoted '0.01' or 'yes' always was: the setting's type decides, not the quotes
    f.write_text("train:\n  flush_denormal: 'true'\n  epochs: '3'\n  max_steps: \"1_000\"\n")
    cfg = load_config(f, ["data.lowercase='false'", "train.seed='7'"])
    assert (cfg.train.flush_denormal, cfg.train.epochs, cfg.train.max_steps) == (True, 3, 1000)
    assert cfg.data.lowercase is False and type(cfg.train.seed) is int and cfg.train.seed == 7
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got str '3.0'"):
        load_config(None, ["train.epochs='3.0'"])


def test_an_unknown_tracker_is_a_config_error_before_anything_starts(tmp_path):
    from distsent.build import build_accelerator

    cfg = load_config(None, ["log.trackers=[wandb, tensorbord]", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="log.trackers: unknown tracker 'tensorbord'; Accelerate's are .*tensorboard"):
        build_accelerator(cfg, tmp_path)
    # a known tracker whose package this environment lacks (the tests install wandb only): Accelerate would log
    # nothing to it, with a warning only
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    # WANDB_MODE wins over log.wandb.mode: a value wandb refuses would stop the run only once it has started
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "ofline")
        refused = "WANDB_MODE='ofline' .environment.: W&B refuses it: Input should be 'online', 'offline'"
        with pytest.raises(ConfigError, match=refused):
            build_accelerator(load_config(None, [f"output_dir={tmp_path}"]), tmp_path)
        build_accelerator(load_config(None, [f"output_dir={tmp_path}", "log.trackers=[]"]), tmp_path)  # not used
    # tags and a project wandb refuses, or tags it keeps with their spaces: refused before the run
    long_tag, spaced = "log.wandb.tags=['" + "x" * 65 + "']", "WANDB_TAGS='a, b' (environment): tag ' b' has spaces"
    for env, override, message in (
            ("a, b", None, spaced),
            ("a,,b", None, "WANDB_TAGS='a,,b' (environment): W&B refuses it: Value error, Tag at index 1 is empty."),
            ("", long_tag, "log.wandb.tags: W&B refuses it: Value error, Tag 'xxx"),
            ("", "log.wandb.project=team/sentiment", "log.wandb.project: W&B refuses it: Invalid project name"),
            ("a", "log.wandb.tags=[' y ']", None)):  # WANDB_TAGS replaces the YAML's
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WANDB_TAGS", env) if env else patch.delenv("WANDB_TAGS", raising=False)
            cfg = load_config(None, [f"output_dir={tmp_path}", *filter(None, [override])])
            if message is None:
                build_accelerator(cfg, tmp_path)
                continue
            with pytest.raises(ConfigError, match=re.escape(message)):
                build_accelerator(cfg, tmp_path)
    with pytest.MonkeyPatch.context() as patch:  # exported empty: wandb reads no mode at all
        patch.setenv("WANDB_MODE", "")
        with pytest.raises(ConfigError, match="WANDB_MODE='' .environment.: W&B refuses it"):
            build_accelerator(load_config(None, [f"output_dir={tmp_path}"]), tmp_path)
        patch.delenv("WANDB_MODE")
        patch.setitem(sys.modules, "wandb", None)  # installed but cannot be imported: it would fail at the start
        with pytest.raises(ConfigError, match="wandb is installed but cannot be imported"):
            build_accelerator(load_config(None, [f"output_dir={tmp_path}"]), tmp_path)
    missing = next((t.value for t in LoggerType if t.value != "all" and t not in get_available_trackers()), None)
    if missing is None:
        pytest.skip("every tracker Accelerate knows is installed here")
    cfg = load_config(None, [f"log.trackers=[{missing}]", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=f"log.trackers: '{missing}' is not installed in this Python environment"):
        build_accelerator(cfg, tmp_path)


@pytest.mark.parametrize("override, message", [
    (None, None),
    ("train.epoch=3", "config error: the override train.epoch=3: train.epoch: unknown key"),
    ("data.path={tmp}/nowhere", "DataError: data.path {tmp}/nowhere: no such folder"),
    ("log.trackers=[wandb, tensorbord]", "ConfigError: log.trackers: unknown tracker 'tensorbord'"),
    ("model.pretrained_embeddings={tmp}/vectors.txt", "model.pretrained_embeddings: {tmp}/vectors.txt: no such file"),
    ("model.freeze_embeddings=true", "ConfigError: model.freeze_embeddings: needs model.pretrained_embeddings"),
    ("checkpoint.resume=never", "checkpoint.resume=never: {tmp}/used holds an earlier run (metrics.jsonl)"),
    # the data is read as training reads it
    ("data.label_column=category", "DataError: {tmp}/data/train.csv: no 'category' column (columns: text, label); "
                                   "name the column with data.text_column / data.label_column (distsent-evaluate"),
    ("data.path={tmp}/unseen", "unseen/test.csv: line 3 has label 'refund', which is not one of the classes"),
    ("output_dir={tmp}/afile", "ConfigError: output_dir {tmp}/afile: a file, not a folder"),  # the run: exit 74
])
def test_check_finds_what_would_stop_a_queued_job_and_writes_nothing(tmp_path, capsys, override, message):
    """distsent-train --check: exit 0 naming the data files found, or 2 naming the problem; no run directory."""
    from distsent.train import main

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.csv").write_text("text,label\n" + "".join(f"good {i},joy\nbad {i},anger\n" for i in range(5)))
    (tmp_path / "unseen").mkdir()
    (tmp_path / "unseen" / "train.csv").write_text((data / "train.csv").read_text())
    (tmp_path / "unseen" / "test.csv").write_text("text,label\ngood,joy\nmoney back,refund\n")
    (tmp_path / "afile").write_text("")
    run_dir = tmp_path / ("used" if override == "checkpoint.resume=never" else "run")
    if override == "checkpoint.resume=never":
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("")
    args = ["--check", "--config", str(CONFIGS[0].parent / "emotion.yaml"), f"data.path={data}", f"output_dir={run_dir}"]
    code = main(args + ([override.format(tmp=tmp_path)] if override else []))
    out, err = capsys.readouterr()
    if message is None:
        assert code == 0 and f"config OK; data: train {data}/train.csv, test {data}/test.csv: 9 train / 1 val / 10 " \
                             f"test texts, 2 classes ['anger', 'joy']; run directory {run_dir} (a new run)" in out, err
    else:
        assert code == 2 and message.format(tmp=tmp_path) in err, err
    assert not run_dir.exists() or [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]


def test_a_second_config_file_is_refused_not_silently_preferred(capsys):
    from distsent.train import main

    first, second = (str(CONFIGS[0].parent / name) for name in ("smoke.yaml", "emotion.yaml"))
    with pytest.raises(SystemExit) as exit_:
        main(["--check", "--config", first, "--config", second])
    assert exit_.value.code == 2
    assert f"--config given twice ({first}, {second}): one config file per run" in capsys.readouterr().err
    # overrides on both sides of an option
    assert main(["--config", second, "train.seed=3", "--help-config", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "\ntrain.seed = 3 (default 0): " in out and "\ntrain.epochs = 2 (default 5): " in out


def test_help_config_shows_a_configs_values_beside_the_defaults(capsys):
    from distsent.train import main

    assert main(["--help-config"]) == 0
    assert "\ntrain.epochs = 5: Passes over the training split." in "\n" + capsys.readouterr().out
    assert main(["--help-config", "--config", str(CONFIGS[0].parent / "emotion.yaml"), "train.seed=3"]) == 0
    out = "\n" + capsys.readouterr().out
    assert "\ntrain.epochs = 8 (default 5): " in out and "\ntrain.seed = 3 (default 0): " in out
    assert "\nmodel.cell = 'lstm': " in out  # the same as the default: shown once


def test_help_config_into_a_pipe_closed_early_ends_quietly(monkeypatch):
    """`distsent-train --help-config | head`: head stops reading; no BrokenPipeError traceback."""
    import os
    import sys

    from distsent.train import main

    read, write = os.pipe()
    os.close(read)
    out = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["--help-config"]) == 0
    finally:
        out.close()
