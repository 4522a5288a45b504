"""bench/stage_speed.py (its overrides), bench/oracle_tokens.py (where the oracle puts each object, spelled-out
answers) bench/relation_ceiling.py (grid cells of a relation question's objects) and bench/relation_text.py (its tasks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import preset
from blip3o.world.language import COLUMNS, ROWS, object_location
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import COLORS, SHAPES
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SPEED = load_script(ROOT / "bench" / "stage_speed.py")
ORACLE = load_script(ROOT / "bench" / "oracle_tokens.py")
CEILING = load_script(ROOT / "bench" / "relation_ceiling.py")
RELATION_TEXT = load_script(ROOT / "bench" / "relation_text.py")


def test_stage_overrides_rebuild_the_run_and_change_only_the_timed_stage() -> None:
    config = apply_overrides(preset("shapes-object"), ["stages.understanding.steps=8000"])
    items = SPEED.stage_overrides(config, "refine", 40, 5, "bf16")
    timed = apply_overrides(preset("shapes-object"), items)
    assert timed.precision == "bf16"
    assert (timed.stage("refine").steps, timed.stage("refine").log_every) == (40, 5)
    assert timed.stage("understanding").steps == 8000  # the run's own override survives
    assert timed.stage("relation") == config.stage("relation")


def test_oracle_token_holds_each_object_in_the_cell_of_its_centre() -> None:
    torch.manual_seed(0)
    oracle = ORACLE.OracleTokens(8)
    scene = sample_scene(np.random.default_rng(3))
    tokens = oracle([scene])  # (16, 8)
    assert tokens.shape == (16, 8)
    filled = set()
    for obj in scene.objects:
        r, c = min(int(obj.center[1] // 16), 3), min(int(obj.center[0] // 16), 3)
        filled.add(r * 4 + c)
    for index in range(16):
        r, c = divmod(index, 4)
        rest = tokens[index] - oracle.row[r] - oracle.col[c]
        assert torch.allclose(rest, oracle.empty, atol=1e-6) == (index not in filled)


def test_cell_embeddings_add_each_cells_row_and_column_to_every_image_of_the_tower_output() -> None:
    from types import SimpleNamespace

    class Tower(torch.nn.Module):  # stands in for the vision tower: returns its input as the merged tokens
        def forward(self, x):
            return SimpleNamespace(pooler_output=x)

    torch.manual_seed(0)
    oracle, backbone = ORACLE.OracleTokens(8), SimpleNamespace(vision_tower=Tower())
    ORACLE.add_cell_embeddings(backbone, oracle)
    tokens = torch.randn(2 * 16, 8)  # two images' merged tokens, raster order
    added = (backbone.vision_tower(tokens).pooler_output - tokens).reshape(2, 4, 4, 8)
    for r in range(4):
        for c in range(4):
            for image in range(2):
                assert torch.allclose(added[image, r, c], oracle.row[r] + oracle.col[c], atol=1e-6)


def test_oracle_objects_carry_their_thirds_when_asked() -> None:
    torch.manual_seed(0)
    oracle = ORACLE.OracleTokens(8, thirds=True)
    scene = sample_scene(np.random.default_rng(3))
    tokens = oracle([scene])  # (16, 8)
    obj = scene.objects[0]
    index = min(int(obj.center[1] // 16), 3) * 4 + min(int(obj.center[0] // 16), 3)
    others = [
        o
        for o in scene.objects[1:]
        if ORACLE.GRID * min(int(o.center[1] // 16), 3) + min(int(o.center[0] // 16), 3) == index
    ]
    assert not others  # this scene's first object has its cell to itself
    row, col = object_location(obj, scene.size)
    expected = (
        oracle.row[index // 4] + oracle.col[index % 4] + oracle.shape[SHAPES.index(obj.shape)]
        + oracle.colour[list(COLORS).index(obj.color)] + oracle.third_row[ROWS.index(row)]
        + oracle.third_col[COLUMNS.index(col)]
    )  # fmt: skip
    torch.testing.assert_close(tokens[index], expected)


def test_shape_sentences_name_the_colour_of_each_shape_seen_once() -> None:
    scene = sample_scene(np.random.default_rng(1))  # orange circle, red square, blue square, orange cross
    text = ORACLE.shape_sentences(scene, np.random.default_rng(0))
    shapes = [o.shape for o in scene.objects]
    expected = {f"The {o.shape} is {o.color}." for o in scene.objects if shapes.count(o.shape) == 1}
    assert expected and set(s.strip() + "." for s in text.split(".") if s.strip()) == expected


def test_relation_steps_spell_out_where_each_object_is_and_keep_the_answer_last() -> None:
    scene = sample_scene(np.random.default_rng(0))  # blue triangle top right, red square middle right
    question = "is the blue triangle below the red square?"
    spelled = ORACLE.relation_steps(question, "no", scene)
    assert spelled == "blue triangle top right, red square middle right, so no"
    assert ORACLE.relation_steps(question, "no", scene, holds=True) == (
        "blue triangle top right, red square middle right, blue triangle above red square, so no"
    )
    left = "is the blue triangle left of the red square?"  # neither left of nor right of holds
    assert ORACLE.relation_steps(left, "no", scene, truth=True) == (
        "blue triangle top right, red square middle right, blue triangle level with red square, so no"
    )
    assert ORACLE.final_answer(spelled) == "no" and ORACLE.final_answer("two") == "two"
    assert ORACLE.relation_steps("what colour is the square?", "red", scene) == "red"
    for asked in (
        "what colour is the square?",
        "which colour is the square?",
        "what is the color of the square?",
    ):
        assert ORACLE.colour_steps(asked, "red", scene) == "square middle right, so red"
    assert ORACLE.colour_steps("is the blue triangle below the red square?", "no", scene) == "no"
    batch = {
        "prompts": [question, [question, "how many shapes are there?"]],
        "answers": ["no", ["no", "two"]],
    }
    ORACLE.spell_out(batch, [scene, scene], ORACLE.relation_steps)
    assert batch["answers"] == [spelled, [spelled, "two"]]


def test_relation_key_names_the_grid_cells_of_both_objects_by_box_centre() -> None:
    scene = sample_scene(np.random.default_rng(0))  # blue triangle top right, red square middle right
    question = "is the blue triangle below the red square?"
    key = CEILING.relation_key(scene, question, 3)
    assert key == ((2, 0), (2, 1), "below")
    assert CEILING.relation_key(scene, "what colour is the square?", 3) is None
    assert CEILING.relation_key(scene, question, 1) == ((0, 0), (0, 0), "below")


def test_relation_text_tasks_write_the_places_and_label_each_task() -> None:
    scene = sample_scene(np.random.default_rng(0))  # blue triangle top right, red square middle right
    question = "is the blue triangle below the red square?"
    places = "blue triangle top right, red square middle right."
    assert RELATION_TEXT.example(question, "no", scene, "relation") == (f"{places} {question} =", "no")
    assert RELATION_TEXT.example(question, "no", scene, "column_order") == (
        f"{places} =",
        "no",
    )  # same column
    listed = RELATION_TEXT.example(question, "no", scene, "holds_listed")
    assert listed == (f"{places} blue triangle above red square. {question} =", "no")
    # The truth on the asked axis (above / below here) is "above"; asked "left of", neither holds.
    assert RELATION_TEXT.example(question, "no", scene, "axis_truth") == (f"{places} {question} :", "above")
    then = RELATION_TEXT.example(question, "no", scene, "truth_then_answer")
    assert then == (f"{places} {question} blue triangle above red square =", "no")
    mixed = RELATION_TEXT.training_rows([(scene, [(question, "no")])], "relation_mixed")
    assert [answer for _, answer in mixed] == ["no", "above"]
    assert RELATION_TEXT.example("what colour is the square?", "red", scene, "relation") is None


def test_relation_text_all_objects_writes_every_place_in_scene_order() -> None:
    rng = np.random.default_rng(3)
    scene = next(s for s in (sample_scene(rng) for _ in range(50)) if len(s.objects) >= 3)
    a, b = (
        scene.objects[-1],
        scene.objects[0],
    )  # B listed before A: the order says nothing about which is asked
    question = f"is the {a.color} {a.shape} left of the {b.color} {b.shape}?"
    text, answer = RELATION_TEXT.example(question, "yes", scene, "relation", all_objects=True)
    listed = [f"{o.color} {o.shape} {' '.join(object_location(o, scene.size))}" for o in scene.objects]
    assert (text, answer) == (f"{', '.join(listed)}. {question} =", "yes")
    pair = RELATION_TEXT.example(question, "yes", scene, "relation")[0]
    assert pair.startswith(f"{a.color} {a.shape} ") and pair.count(",") == 1


def test_relation_examples_keep_only_relation_questions_of_the_images_that_have_them() -> None:
    examples = [
        ORACLE.Example(None, "s", "l", [("how many shapes are there?", "two"), ("is the red circle above the blue star?", "no")]),
        ORACLE.Example(None, "s", "l", [("what colour is the star?", "blue")]),
    ]  # fmt: skip
    kept = ORACLE.relation_examples(examples)
    assert [ex.qa for ex in kept] == [[("is the red circle above the blue star?", "no")]]
    assert examples[0].qa[0] == ("how many shapes are there?", "two")  # the input is left as it was


def test_draw_rows_takes_relation_only_copies_at_the_asked_share() -> None:
    before = np.random.default_rng(5).integers(100, size=64).tolist()
    assert ORACLE.draw_rows(np.random.default_rng(5), 100, 160, 64, 0.0) == before
    assert all(r >= 100 for r in ORACLE.draw_rows(np.random.default_rng(5), 100, 160, 64, 1.0))
    rows = ORACLE.draw_rows(np.random.default_rng(5), 100, 160, 4000, 0.3)
    share = np.mean([r >= 100 for r in rows])
    assert 0.27 < share < 0.33 and max(rows) < 160


def test_where_accuracy_scores_each_word_of_the_place() -> None:
    """A reader that answers every where-question right scores 1 on all three figures; one that always says the
    right row and a wrong column scores 1 on rows and 0 on columns and both; the scenes reach the hook state."""
    from blip3o.eval.vqa import vqa_scene
    from blip3o.world.language import location_questions

    class Reader:
        """Answers from the scenes the harness puts in the hook state, as the oracle's tokens would carry them."""

        def __init__(self, wrong_column: bool) -> None:
            self.wrong_column = wrong_column

        def understand(self, images, questions, max_new_tokens):
            assert len(images) == len(questions) == len(state["scenes"])
            replies = []
            for scene, question in zip(state["scenes"], questions, strict=True):
                answer = {qa.question: qa.answer for qa in location_questions(scene)}[question]
                row, column = answer.split()
                other = next(c for c in COLUMNS if c != column)
                replies.append(f"{row} {other}" if self.wrong_column else f"{answer} extra words")
            return replies

    assert location_questions(vqa_scene(0))  # the first images do hold where-questions
    state: dict = {"scenes": None}
    right = ORACLE.where_accuracy(Reader(False), state, n_images=4, batch=3)
    assert (right["both"], right["row"], right["column"]) == (1.0, 1.0, 1.0) and right["questions"] > 3
    rows_only = ORACLE.where_accuracy(Reader(True), state, n_images=4, batch=3)
    assert (rows_only["both"], rows_only["row"], rows_only["column"]) == (0.0, 1.0, 0.0)


def test_scene_embedding_probe_reads_the_exact_target_back_and_not_noise() -> None:
    from blip3o.train.scene_supervision import SceneEmbeddingTable

    probe = load_script(ROOT / "bench" / "scene_embedding_probe.py")
    scenes = [sample_scene(np.random.default_rng([3, i])) for i in range(20)]
    table = SceneEmbeddingTable(64)
    exact = probe.decode_cells(table.targets(scenes, 4), table, scenes)
    n = exact["object cells"]
    assert n > 20 and all(exact[k] == n for k in ("shape", "colour", "row", "column", "place", "all"))
    assert exact["read empty"] == exact["empty cells"] > 0
    noise = probe.decode_cells(torch.randn(20, 16, 64) * 3, table, scenes)
    assert noise["all"] < n / 4


def test_token_adapter_starts_as_the_identity_and_adds_its_map() -> None:
    from types import SimpleNamespace

    class Tower(torch.nn.Module):  # stands in for the vision tower: returns its input as the merged tokens
        def forward(self, x):
            return SimpleNamespace(pooler_output=x)

    adapter, backbone = torch.nn.Linear(8, 8), SimpleNamespace(vision_tower=Tower())
    torch.nn.init.zeros_(adapter.weight)
    torch.nn.init.zeros_(adapter.bias)
    ORACLE.add_token_adapter(backbone, adapter)
    tokens = torch.randn(2 * 16, 8)
    assert torch.equal(backbone.vision_tower(tokens).pooler_output, tokens)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(8))
    torch.testing.assert_close(backbone.vision_tower(tokens).pooler_output, 2 * tokens)


def test_table_or_tower_gives_each_image_the_target_unless_it_is_marked_for_the_tower() -> None:
    from types import SimpleNamespace

    from blip3o.train.scene_supervision import SceneEmbeddingTable

    class Tower(torch.nn.Module):  # stands in for the vision tower: returns its input as the merged tokens
        def forward(self, x):
            return SimpleNamespace(pooler_output=x)

    table, backbone = SceneEmbeddingTable(8, 4), SimpleNamespace(vision_tower=Tower())
    scenes = [sample_scene(np.random.default_rng(i)) for i in range(3)]
    state = {"scenes": scenes, "tower": [False, True, False]}
    ORACLE.use_table_or_tower(backbone, table, state)
    tower_tokens = torch.randn(3 * 16, 8)  # three images' merged tokens, raster order
    out = backbone.vision_tower(tower_tokens).pooler_output.reshape(3, 16, 8)
    target = table.targets(scenes, 4)  # (3, 16, 8)
    assert torch.equal(out[0], target[0]) and torch.equal(out[2], target[2])
    assert torch.equal(out[1], tower_tokens.reshape(3, 16, 8)[1])
    state["tower"] = True  # one flag for every image: what --eval-tower sets
    assert torch.equal(backbone.vision_tower(tower_tokens).pooler_output, tower_tokens)
    state["tower"] = False
    assert torch.equal(backbone.vision_tower(tower_tokens).pooler_output.reshape(3, 16, 8), target)
