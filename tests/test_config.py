"""refstream.config.load_model_config: presets, custom YAML files, and the errors a user can cause."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from refstream.config import CONFIG_DIR, ModelConfig, load_model_config
from refstream.errors import ConfigError, RefStreamError


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_data() -> dict:
    return yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())


class TestPresets:
    def test_tiny_preset_is_random_and_small(self):
        cfg = load_model_config("tiny")
        assert isinstance(cfg, ModelConfig)
        assert cfg.name == "tiny"
        assert cfg.random_weights is True
        assert cfg.clip.weights is None and cfg.internvideo2.size == "tiny" and cfg.sam2.size == "tiny"
        assert cfg.llm["vocab_size"] == 265
        assert cfg.llm["max_position_embeddings"] == 4096
        assert cfg.seg_dim == 128

    def test_videoglamm_preset_is_the_released_model(self):
        cfg = load_model_config("videoglamm")
        assert cfg.random_weights is False
        assert cfg.clip.weights == "openai/clip-vit-large-patch14-336"
        assert cfg.sam2.weights == "facebook/sam2-hiera-large-hf"
        assert cfg.llm["vocab_size"] == 32012 and cfg.llm["hidden_size"] == 3072
        assert (cfg.seg_dim, cfg.num_frames, cfg.clip_pool, cfg.internvideo2_pool) == (256, 16, 12, 8)
        assert cfg.checkpoint is None

    def test_checkpoint_override(self, tmp_path):
        cfg = load_model_config("videoglamm", checkpoint=str(tmp_path / "ckpt"))
        assert cfg.checkpoint == str(tmp_path / "ckpt")
        # a Path is accepted and stored as a string
        assert load_model_config("videoglamm", checkpoint=tmp_path).checkpoint == str(tmp_path)

    def test_config_is_frozen(self):
        cfg = load_model_config("tiny")
        with pytest.raises(pydantic.ValidationError):
            cfg.seed = 3


class TestErrors:
    def test_unknown_preset_names_the_presets(self):
        with pytest.raises(ConfigError) as info:
            load_model_config("tinyy")
        msg = str(info.value)
        assert "tinyy" in msg and "tiny" in msg and "videoglamm" in msg
        assert isinstance(info.value, RefStreamError) and info.value.exit_code == 2

    def test_missing_yaml_file(self, tmp_path):
        with pytest.raises(ConfigError, match="nope.yaml"):
            load_model_config(str(tmp_path / "nope.yaml"))

    def test_existing_file_without_yaml_suffix(self, tmp_path):
        path = write_yaml(tmp_path / "model.txt", tiny_data())
        with pytest.raises(ConfigError):
            load_model_config(str(path))

    def test_unknown_top_level_field_is_named(self, tmp_path):
        data = tiny_data()
        data["bogus_field"] = 1
        with pytest.raises(ConfigError) as info:
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))
        assert "bogus_field" in str(info.value)
        assert str(tmp_path / "m.yaml") in str(info.value)

    def test_unknown_nested_field_is_named(self, tmp_path):
        data = tiny_data()
        data["clip"]["bogus_nested"] = True
        with pytest.raises(ConfigError, match="bogus_nested"):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    def test_wrong_type_is_named(self, tmp_path):
        data = tiny_data()
        data["seed"] = "not-a-number"
        with pytest.raises(ConfigError, match="seed"):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    def test_bad_literal_is_named(self, tmp_path):
        data = tiny_data()
        data["sam2"]["size"] = "huge"
        with pytest.raises(ConfigError, match="size"):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    def test_missing_required_name(self, tmp_path):
        data = tiny_data()
        del data["name"]
        with pytest.raises(ConfigError, match="name"):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    def test_invalid_yaml_syntax(self, tmp_path):
        path = tmp_path / "broken.yml"
        path.write_text("name: [unclosed\n  seed: :\n")
        with pytest.raises(ConfigError, match="cannot read model config .*broken.yml"):
            load_model_config(str(path))

    @pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", "42\n"])
    def test_top_level_not_a_mapping(self, tmp_path, text):
        path = tmp_path / "list.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="mapping"):
            load_model_config(str(path))
        with pytest.raises(ConfigError, match="mapping"):
            load_model_config(str(path), checkpoint="somewhere")

    def test_empty_yaml_reports_missing_name(self, tmp_path):
        path = tmp_path / "empty.yaml"
        path.write_text("")
        with pytest.raises(ConfigError, match="name"):
            load_model_config(str(path))


class TestCustomYaml:
    def test_valid_custom_yaml(self, tmp_path):
        data = tiny_data()
        data.update(name="custom", seed=7, max_new_tokens=5, forced_answer="It is [SEG].")
        cfg = load_model_config(str(write_yaml(tmp_path / "custom.yaml", data)))
        assert (cfg.name, cfg.seed, cfg.max_new_tokens, cfg.forced_answer) == ("custom", 7, 5, "It is [SEG].")
        assert cfg.random_weights is True
        assert cfg.clip.vision["hidden_size"] == 64
        # defaults fill what the file leaves out
        assert cfg.system_prompt == "You are a helpful AI assistant."

    def test_minimal_yaml_uses_defaults(self, tmp_path):
        cfg = load_model_config(str(write_yaml(tmp_path / "min.yml", {"name": "m"})))
        assert cfg.name == "m" and cfg.random_weights is False and cfg.seed == 0
        assert cfg.question == "What is {expression} in this video? Please respond with segmentation masks."
        assert cfg.forced_answer == "Sure, [SEG]."

    def test_checkpoint_override_of_custom_yaml(self, tmp_path):
        data = tiny_data()
        data["checkpoint"] = "/from/file"
        path = write_yaml(tmp_path / "c.yaml", data)
        assert load_model_config(str(path)).checkpoint == "/from/file"
        assert load_model_config(str(path), checkpoint="/from/cli").checkpoint == "/from/cli"
