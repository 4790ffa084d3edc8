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
        assert cfg.clip.weights is None and cfg.internvideo2.weights is None and cfg.sam2.weights is None
        assert (cfg.internvideo2.hidden_size, cfg.internvideo2.num_hidden_layers) == (64, 2)
        assert (cfg.sam2.image_size, cfg.sam2.hiera.embed_dim_per_stage) == (256, [32, 64, 128, 256])
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

    def test_videoglamm_preset_has_the_released_sizes(self):
        cfg = load_model_config("videoglamm")
        iv2, sam2 = cfg.internvideo2, cfg.sam2
        assert (iv2.hidden_size, iv2.num_hidden_layers, iv2.num_attention_heads, iv2.intermediate_size) == (
            1408, 39, 16, 6144)
        assert sam2.image_size == 1024 and sam2.hiera.blocks_per_stage == [2, 6, 36, 4]
        assert sam2.hiera.global_attention_blocks == [23, 33, 43]

    def test_both_modules_share_one_schema(self):
        """refstream.config re-exports workers.config: one class, so isinstance checks agree."""
        import refstream.config
        import workers.config

        for name in ("ModelConfig", "Sam2Spec", "InternVideo2Spec", "load_model_config", "CONFIG_DIR", "PRESETS"):
            assert getattr(refstream.config, name) is getattr(workers.config, name)

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
        data["sam2"]["init"] = "huge"
        with pytest.raises(ConfigError, match="init"):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    @pytest.mark.parametrize("part", ["sam2", "internvideo2"])
    def test_old_size_switch_says_what_replaces_it(self, tmp_path, part):
        data = tiny_data()
        data[part]["size"] = "tiny"
        with pytest.raises(ConfigError) as info:
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))
        assert f"{part}.size" in str(info.value) and "configs/tiny.yaml" in str(info.value)

    @pytest.mark.parametrize("part, field, value, message", [
        ("internvideo2", "hidden_size", 0, "greater than 0"),
        ("internvideo2", "hidden_size", "wide", "hidden_size"),
        ("internvideo2", "num_attention_heads", 5, "not a multiple of num_attention_heads"),
        ("sam2", "image_size", 200, "multiple of 64"),
        ("sam2", "memory_encoder_output_channels", 48, "memory_encoder_output_channels"),
    ])
    def test_invalid_size_is_refused(self, tmp_path, part, field, value, message):
        data = tiny_data()
        data[part][field] = value
        with pytest.raises(ConfigError, match=message) as info:
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))
        assert str(tmp_path / "m.yaml") in str(info.value) and field in str(info.value)

    @pytest.mark.parametrize("field, value, message", [
        ("embed_dim_per_stage", [32, 64, 128], "at least 4"),
        ("hidden_size", 48, "embed_dim_per_stage"),
        ("global_attention_blocks", [9], "outside the 5 blocks"),
        ("num_attention_heads_per_stage", [1, 3, 2, 4], "not a multiple of its 3 heads"),
    ])
    def test_invalid_hiera_is_refused(self, tmp_path, field, value, message):
        data = tiny_data()
        data["sam2"]["hiera"][field] = value
        with pytest.raises(ConfigError, match=message):
            load_model_config(str(write_yaml(tmp_path / "m.yaml", data)))

    def test_incomplete_size_section_is_refused(self, tmp_path):
        data = tiny_data()
        del data["sam2"]["mask_decoder"]
        with pytest.raises(ConfigError, match="mask_decoder"):
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
        # a left-out size section is the released model's (configs/videoglamm.yaml)
        full = load_model_config("videoglamm")
        assert cfg.sam2 == full.sam2 and cfg.internvideo2 == full.internvideo2
        assert cfg.question == "What is {expression} in this video? Please respond with segmentation masks."
        assert cfg.forced_answer == "Sure, [SEG]."

    def test_checkpoint_override_of_custom_yaml(self, tmp_path):
        data = tiny_data()
        data["checkpoint"] = "/from/file"
        path = write_yaml(tmp_path / "c.yaml", data)
        assert load_model_config(str(path)).checkpoint == "/from/file"
        assert load_model_config(str(path), checkpoint="/from/cli").checkpoint == "/from/cli"


class TestSizesFromYaml:
    """The SAM2 and InternVideo2 sizes are read from the YAML file: change one and the model follows."""

    def test_changed_widths_build_a_model_of_those_widths(self, tmp_path):
        from workers.build import build_model
        from workers.stats import build_skeleton

        data = tiny_data()
        data["internvideo2"].update(hidden_size=96, num_hidden_layers=3)
        data["sam2"]["hiera"].update(hidden_size=48, embed_dim_per_stage=[48, 96, 192, 384])
        data["sam2"]["mask_decoder"]["mlp_dim"] = 512
        cfg = load_model_config(str(write_yaml(tmp_path / "wide.yaml", data)))
        model = build_model(cfg)
        assert model.internvideo2.hidden_size == 96 and len(model.internvideo2.host.encoder.layer) == 3
        assert model.mm_projector[0].in_features == 96
        backbone = model.sam2.config.vision_config
        assert backbone.backbone_config.embed_dim_per_stage == [48, 96, 192, 384]
        assert backbone.backbone_channel_list == [384, 192, 96, 48]
        assert model.sam2.config.mask_decoder_config.mlp_dim == 512
        # the meta-device skeleton (model-info, flops) reads the same sizes
        skeleton = build_skeleton(cfg)
        assert skeleton["internvideo2"].hidden_size == 96
        assert skeleton["sam2"].config.vision_config.backbone_config.hidden_size == 48
