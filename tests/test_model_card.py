"""blip3o.eval.model_card: the card's Model section says what the DiT generates, from the run's config; its
provenance says which stages the run did not train itself."""

from __future__ import annotations

import json
from pathlib import Path

from blip3o.eval.model_card import (
    _model_section,
    _scores_section,
    _stage_row,
    final_model_dict,
    instruct_renders_phrase,
    other_sampler_section,
    provenance_sentences,
    recipe_command,
    reuse_source_numbers,
    sampler_phrase,
    stage_objectives_sentence,
    wall_time_sentence,
)
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset


def _target_and_clip_lines(name: str) -> tuple[str, str]:
    lines = _model_section(preset(name).model.to_dict())
    target = next(line for line in lines if line.startswith("- Generation target"))
    clip = next(line for line in lines if line.startswith("- CLIP"))
    return target, clip


def test_model_section_names_the_target_of_each_recipe() -> None:
    target, clip = _target_and_clip_lines("tiny-test")
    assert "the DiT generates all channels" in target and "auxiliary" not in clip
    target, clip = _target_and_clip_lines("shapes")
    assert "all channels" in target and "redraws each patch's pixels" in clip
    target, clip = _target_and_clip_lines("shapes-object")
    assert "the 19 directions its label head reads" in target
    assert "box centre" in clip and "covered share" not in clip


def test_model_section_says_when_the_dit_reads_resampler_slots() -> None:
    def dit_line(name: str) -> str:
        return next(line for line in _model_section(preset(name).model.to_dict()) if line.startswith("- DiT"))

    assert (
        "9 slot tokens of a condition resampler (2 layers) over the prompt's last 24 word embeddings and the query states"
        in dit_line("shapes-object")
    )
    assert "resampler" not in dit_line("shapes") and "word" not in dit_line("shapes")
    worded = preset("shapes").model.to_dict()
    worded["backbone"]["condition_word_tokens"] = 8
    line = next(line for line in _model_section(worded) if line.startswith("- DiT"))
    assert "Its condition is the prompt's last 8 word embeddings and the query states." in line


def test_model_section_names_decoder_candidates_only_when_there_are_several() -> None:
    def decoder_line(model: dict) -> str:
        return next(line for line in _model_section(model) if line.startswith("- Pixel decoder"))

    model = preset("shapes-object").model.to_dict()
    assert "decoded" not in decoder_line(model)
    model["decoder"]["sample_candidates"] = 4
    assert "each DiT sample is decoded 4 times and the decode whose CLIP reading agrees best" in decoder_line(
        model
    )


def test_model_section_names_a_guidance_interval_only_when_there_is_one() -> None:
    def dit_line(model: dict) -> str:
        return next(line for line in _model_section(model) if line.startswith("- DiT"))

    model = preset("shapes-object").model.to_dict()
    assert "guidance" not in dit_line(model)  # guided at every step: nothing to say
    model["flow"].update(cfg_sigma_max=0.7, cfg_outside=0.5)
    assert "sampled with guidance 3 while the noise level is in [0, 0.7] and 2 elsewhere" in dit_line(model)


def _fact(name: str, source: str | None = None, resumed_at: int = 0) -> dict:
    reused = (
        {"source": source, "tool": "tools/reuse_backbone.py", "log": "copied from c.csv"} if source else None
    )
    return {"name": name, "reused": reused, "resumed_at": resumed_at}


def test_provenance_names_each_source_of_reused_stages_and_the_resumed_ones() -> None:
    facts = [_fact("clip", "old/model"), _fact("decoder", resumed_at=5000), _fact("vision", "older/model"),
             _fact("understanding", "older/model"), _fact("generation")]  # fmt: skip
    sentences = provenance_sentences(facts)
    assert sentences == [
        "(1) Stage(s) clip were not trained by this run: their weights were copied from `old/model` by "
        "`tools/reuse_backbone.py`; their curves are that model's training logs (copied from c.csv).",
        "(2) Stage(s) vision, understanding were not trained by this run: their weights were copied from "
        "`older/model` by `tools/reuse_backbone.py`; their curves are that model's training logs (copied from c.csv).",
        "Resumed stages report the wall time of their last session only: decoder from step 5000.",
    ]
    assert provenance_sentences([_fact("generation")]) == []


def test_the_stage_table_cites_each_reused_source_by_its_sentence_number() -> None:
    facts = [_fact("clip", "old/model"), _fact("vision", "older/model"), _fact("decoder", "old/model")]
    numbers = reuse_source_numbers(facts)
    assert numbers == {
        ("old/model", "tools/reuse_backbone.py"): 1,
        ("older/model", "tools/reuse_backbone.py"): 2,
    }
    row = {"kind": "clip", "steps": 1, "batch_size": 1, "lr": 1e-3, "first_loss": 1.0, "last_loss": 0.5,
           "samples_per_s": None, "wall_s": None}  # fmt: skip
    cells = [_stage_row({**f, **row}, numbers).split(" | ")[-1] for f in facts]
    assert cells == ["reused, see (1) below |", "reused, see (2) below |", "reused, see (1) below |"]


def test_wall_time_sentence_says_when_no_stage_was_trained_by_the_run() -> None:
    assert wall_time_sentence(1500.0, ["stage_summary.json"]) == (
        "Training wall time: 25.0 min in all (from stage_summary.json; shard writing before the first stage not "
        "included)."
    )
    assert "none; every stage was filled from another model" in wall_time_sentence(0.0, [])


def test_the_recipe_says_how_often_colourless_pairs_are_rendered() -> None:
    config = preset("shapes-object").to_dict()
    assert instruct_renders_phrase(config) == (
        "4 renders each; 12 in stages `relation`, `count`, `count_shape` for those naming two kinds of object and "
        "no colour"
    )
    next(stage for stage in config["stages"] if stage["name"] == "count")["counting_renders"] = 8
    assert instruct_renders_phrase(config) == (
        "4 renders each; 12 in stages `relation`, `count`, `count_shape` for those naming two kinds of object and "
        "no colour; 8 in stage `count` for counting prompts"
    )
    for stage in config["stages"]:
        del stage["colourless_pair_renders"], stage["counting_renders"]  # a config saved before the fields
    assert instruct_renders_phrase(config) == "4 renders each"
    # Sessions 30-31 saved it as a data field, read by every instruct stage.
    config["data"]["instruct_colourless_pair_renders"] = 12
    assert instruct_renders_phrase(config) == (
        "4 renders each; 12 in stages `instruct`, `relation`, `count`, `count_shape` for those naming two kinds "
        "of object and no colour"
    )


def test_the_recipe_names_each_stages_extra_losses_with_their_weights() -> None:
    config = preset("shapes-object").to_dict()
    sentence = stage_objectives_sentence(config)
    parts = {part.split("`")[0]: part for part in sentence.rstrip(".").lstrip("`").split("; `")}
    assert (
        parts["count"]
        == "count`: slot-label loss 1, slot-relation loss 0.3, slot-binding loss 0.3, count loss 0.1"
    )
    assert parts["count_shape"] == (
        "count_shape`: slot-label loss 1, slot-relation loss 0.3, slot-binding loss 0.3, count loss by shape 0.1"
    )
    with_separation = {**config, "stages": [dict(s) for s in config["stages"]]}
    with_separation["stages"][-1]["separation_weight"] = 0.3
    assert stage_objectives_sentence(with_separation).endswith(
        "count loss by shape 0.1, separation (on its own samples) loss 0.3."
    )
    with_separation["stages"][-1]["own_min_sigma"] = 0.6  # the own step kept to high noise: the card says so
    assert stage_objectives_sentence(with_separation).endswith(
        "count loss by shape 0.1, separation (on its own samples at noise >= 0.6) loss 0.3."
    )
    with_separation["stages"][-1]["own_count_weight"] = 0.3
    with_separation["stages"][-1]["own_count_target"] = "outcome"  # pulled by the finished sample's miscount
    assert stage_objectives_sentence(with_separation).endswith(
        "separation (on its own samples at noise >= 0.6) loss 0.3, "
        "count by shape (on its own samples at noise >= 0.6, by their finished count) loss 0.3."
    )
    refine = (
        "`refine`: 50% of conditions the DiT's renditions (start levels up to 1), each drawn as the render"
    )
    assert refine in sentence
    assert "prompt renders" not in sentence
    prompted = {**config, "stages": [dict(s) for s in config["stages"]]}
    next(s for s in prompted["stages"] if s["name"] == "refine")["prompt_scenes"] = True
    assert (
        "each drawn as the render of what CLIP reads in it, on stage 3's prompt renders, not the shards;"
        in (stage_objectives_sentence(prompted))
    )
    assert "`clip`" not in sentence and "`decoder`" not in sentence  # no extras, no mention
    for stage in config["stages"]:  # a config saved before the fields: nothing to say, and no KeyError
        for key in ("slot_label_weight", "slot_relation_weight", "slot_binding_weight", "count_weight"):
            del stage[key]
        stage.pop("generated_share")
    assert stage_objectives_sentence(config) == ""
    assert stage_objectives_sentence(preset("tiny-test").to_dict()) == ""


def test_the_recipe_command_is_the_preset_with_the_runs_overrides() -> None:
    config = apply_overrides(
        preset("shapes-object"), ["stages.instruct.colourless_pair_renders=12"]
    ).to_dict()
    assert recipe_command(config, Path("runs/x")) == (
        "`blip3o train --preset shapes-object --out runs/x stages.instruct.colourless_pair_renders=12`"
    )
    assert (
        recipe_command(preset("shapes-object").to_dict(), Path("r"))
        == "`blip3o train --preset shapes-object --out r`"
    )
    # No override makes these stages: say so, do not print a wrong command.
    config["stages"] = config["stages"][:2]
    assert recipe_command(config, Path("r")).endswith(
        "(with the differences in the run's config.json, which overrides cannot express)"
    )


def test_another_samplers_scores_are_tabled_next_to_the_runs_own() -> None:
    def summary(overall: float, counting: float, seconds: float, **settings: object) -> dict:
        return {
            "seeds": [0, 1],
            "images_per_seed": 12,
            "settings": {"steps": None, "self_check": 1, **settings},
            "overall": {"mean": overall, "std": 0.01},
            "categories": {"counting": {"mean": counting, "std": 0.02}},
            "timing": {"0": {"generate_s": seconds}, "1": {"generate_s": seconds + 2}},
        }

    own = summary(0.5, 0.25, 100)
    other = summary(0.75, 0.5, 300, self_check=4, self_check_accept=0.25)
    lines = other_sampler_section(own, other, Path("runs/checked"))
    assert "`--decoder-candidates 1 --self-check 4 --self-check-accept 0.25`" in lines[0]  # before candidates
    assert "`runs/checked`" in lines[0]
    assert "| counting | 0.250 ± 0.020 | 0.500 ± 0.020 |" in lines
    assert "| **overall** | **0.500 ± 0.010** | **0.750 ± 0.010** |" in lines
    assert "| sampling time per seed | 101 s | 301 s |" in lines
    resumed = {**other, "timing": {"0": {"generate_s": 5, "sampled_images": 0}}}
    assert other_sampler_section(own, resumed, Path("r"))[-2].endswith("| not measured (resumed) |")
    assert sampler_phrase({"steps": 20, "self_check": 1, "self_check_accept": None}) == "--steps 20"
    assert sampler_phrase({"self_check": 2}) == "--self-check 2"
    assert sampler_phrase({"decoder_candidates": 4, "self_check": 1}) == "--decoder-candidates 4"
    assert sampler_phrase({"count_guidance": 10.0, "self_check": 1}) == "--count-guidance 10"
    assert sampler_phrase({"count_guidance": 0.0, "self_check": 1}) == ""  # off says nothing


def test_scores_say_how_a_summary_put_together_by_hand_was_measured(tmp_path: Path) -> None:
    vqa = {"overall": {"mean": 0.9}, "per_kind": {"color": {"mean": 0.9}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"vqa": vqa}))
    assert any(line.startswith("Measured by the run itself") for line in _scores_section(tmp_path))
    note = "vqa = `blip3o eval vqa --model m` (session 58)"
    (tmp_path / "eval" / "summary.json").write_text(json.dumps({"vqa": vqa, "note": note}))
    lines = _scores_section(tmp_path)
    assert f"Not measured by the run itself; how: {note}." in lines
    assert not any(line.startswith("Measured by the run itself") for line in lines)


def test_a_deepened_dit_is_named_with_its_final_depth() -> None:
    """The run config's model is the DiT as built; a stage's `deepen_dit_after` makes the exported one deeper."""
    config = apply_overrides(preset("tiny-gen"), ["stages.generation.deepen_dit_after=0,1"]).to_dict()
    built = config["model"]["dit"]["n_layers"]
    final = final_model_dict(config)
    assert final["dit"]["n_layers"] == built + 2 and config["model"]["dit"]["n_layers"] == built
    line = next(line for line in _model_section(final) if line.startswith("- DiT"))
    assert line.startswith(f"- DiT: {built + 2} layers")
    sentence = stage_objectives_sentence(config)
    assert "`generation`: first the DiT it receives deepened by gated-off copies of layers 0, 1" in sentence
    assert final_model_dict(preset("tiny-gen").to_dict()) == preset("tiny-gen").to_dict()["model"]
