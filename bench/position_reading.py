"""Where does the language model lose an object's position? Where-questions, answered and probed layer by layer.

    .venv/bin/python bench/position_reading.py MODEL [--scenes 900] [--threads 2]

Why: relation questions sit at chance on every model trained so far. With the vision position code
(`BackboneConfig.vision_position_scale`) and where-questions (`StageConfig.location_questions`) the model
answers "where is the blue star?" with the right row but not the right column, although the column is in
its input. This bench asks the question on fresh renders of scenes with an object unique by colour and shape,
and reads the row and column (thirds of the canvas, `object_location`) back with ridge probes (fit on the
first two thirds of the scenes, scored on the rest) from:
- "cell": the residual at the object's centre-cell image token, after the embeddings and after each layer
  (is the position there to be read?);
- "answer": the residual at the last prompt position, which predicts the first answer word, after the
  embeddings and after each layer (does it reach the answer?);
- "last_layer_heads": each head's output of the last layer at that position (which heads carry it?).
It also prints the cosine similarity of the output embeddings of the second answer word's candidates
(" left" / " centre" / " right" and the rows): with tied embeddings, two words the model cannot tell apart
in its captions end up with nearly the same vector, and then also nearly the same logit.

Figures: docs/bench/understanding_position_trials.txt.
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from blip3o.world.language import COLUMNS, ROWS, location_questions
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene


def where_items(n: int, seed: int, cell_px: int) -> list[dict]:
    """n scenes with at least one object unique by colour and shape; for the first such object: the render,
    its where-question and answer, its row / column index (thirds) and the merged vision token (`cell_px`
    pixels a side, raster order) that holds its box centre."""
    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        scene = sample_scene(rng)
        asked = location_questions(scene)
        if not asked:
            continue
        combos = collections.Counter((o.color, o.shape) for o in scene.objects)
        obj = next(o for o in scene.objects if combos[(o.color, o.shape)] == 1)  # the one asked[0] names
        row, col = asked[0].answer.split()
        cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
        side = scene.size // cell_px
        items.append(
            {
                "image": render(scene),
                "question": asked[0].question,
                "answer": asked[0].answer,
                "row": ROWS.index(row),
                "col": COLUMNS.index(col),
                "cell": min(int(cy // cell_px), side - 1) * side + min(int(cx // cell_px), side - 1),
                "objects": len(scene.objects),
            }
        )
    return items


def probe_accuracy(
    features: np.ndarray, labels: np.ndarray, classes: int, fit: int, ridge: float = 0.1
) -> float:
    """Held-out accuracy of a ridge-regression one-vs-all probe fit on the first `fit` rows of `features`
    (N, D) and scored on the rest."""
    x = np.c_[features.astype(np.float64), np.ones(len(features))]  # (N, D + 1)
    y = np.eye(classes)[labels]  # (N, classes)
    w = np.linalg.solve(
        x[:fit].T @ x[:fit] + ridge * np.eye(x.shape[1]), x[:fit].T @ y[:fit]
    )  # (D + 1, classes)
    return float(((x[fit:] @ w).argmax(1) == labels[fit:]).mean())


def answer_accuracy(items: list[dict], answers: list[str]) -> dict:
    """Row (first word) and column (second word) accuracy, overall and on single-object scenes."""
    words = [a.split() for a in answers]
    row = [w[:1] == [ROWS[it["row"]]] for w, it in zip(words, items, strict=True)]
    col = [w[1:2] == [COLUMNS[it["col"]]] for w, it in zip(words, items, strict=True)]
    single = [i for i, it in enumerate(items) if it["objects"] == 1]
    return {
        "row": round(float(np.mean(row)), 3),
        "column": round(float(np.mean(col)), 3),
        "single_object_row": round(float(np.mean([row[i] for i in single])), 3) if single else None,
        "single_object_column": round(float(np.mean([col[i] for i in single])), 3) if single else None,
        "most_common_answers": collections.Counter(answers).most_common(4),
    }


def word_similarity(backbone, words: list[str]) -> list[list[float]]:
    """Cosine similarity of the output embeddings of each word's first token."""
    tokenizer = backbone._require_processor().tokenizer
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
    table = backbone.vlm.get_output_embeddings().weight.detach().float()[ids]  # (W, H)
    unit = torch.nn.functional.normalize(table, dim=1)
    return [[round(float(v), 3) for v in row] for row in unit @ unit.T]


@torch.no_grad()
def collect(backbone, items: list[dict], batch: int) -> dict[str, np.ndarray]:
    """Residuals at the object's cell and at the answer position (embeddings + each layer), and the last
    layer's per-head outputs at the answer position (its o_proj input)."""
    processor = backbone._require_processor()
    image_token = backbone.vlm.config.image_token_id
    last = backbone.vlm.model.language_model.layers[-1].self_attn.o_proj
    captured = {}
    hook = last.register_forward_hook(lambda mod, args, out: captured.__setitem__("heads", args[0][:, -1]))
    cells, answers, heads = [], [], []
    try:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            inputs = processor(
                text=backbone._prompt_texts([it["question"] for it in chunk]),
                images=[it["image"] for it in chunk],
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
            hidden = backbone.vlm(**inputs, output_hidden_states=True, use_cache=False).hidden_states
            stacked = torch.stack(hidden, 1)  # (B, layers + 1, T, H)
            answers.append(stacked[:, :, -1])  # (B, layers + 1, H)
            heads.append(captured["heads"])  # (B, heads * head_dim)
            for b, it in enumerate(chunk):
                position = (inputs["input_ids"][b] == image_token).nonzero().flatten()[it["cell"]]
                cells.append(stacked[b, :, position])  # (layers + 1, H)
    finally:
        hook.remove()
    return {
        "cell": torch.stack(cells).float().numpy(),
        "answer": torch.cat(answers).float().numpy(),
        "heads": torch.cat(heads).float().numpy(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder")
    parser.add_argument("--scenes", type=int, default=900)
    parser.add_argument("--seed", type=int, default=21, help="world seed of the fresh renders")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.scenes < 6:
        parser.error("--scenes must be at least 6 (a third of them score the probes)")
    from blip3o.models.blip3o import Blip3o

    torch.set_num_threads(args.threads)
    backbone = Blip3o.from_pretrained(args.model).eval().backbone
    # A merged vision token covers patch_size x spatial_merge_size pixels a side.
    cell_px = backbone.config.patch_size * backbone.config.spatial_merge_size
    items = where_items(args.scenes, args.seed, cell_px)
    answers = []
    for start in range(0, len(items), args.batch):
        chunk = items[start : start + args.batch]
        answers += backbone.understand([it["image"] for it in chunk], [it["question"] for it in chunk])
    features = collect(backbone, items, args.batch)
    fit = 2 * len(items) // 3
    rows, cols = np.array([it["row"] for it in items]), np.array([it["col"] for it in items])

    def probes(x: np.ndarray) -> dict:
        return {
            "row": round(probe_accuracy(x, rows, 3, fit), 3),
            "column": round(probe_accuracy(x, cols, 3, fit), 3),
        }

    head_dim = features["heads"].shape[1] // backbone.vlm.config.text_config.num_attention_heads
    result = {
        "model": args.model,
        "scenes": len(items),
        "answers": answer_accuracy(items, answers),
        "majority": {
            "row": float(np.bincount(rows[fit:]).max() / len(rows[fit:])),
            "column": float(np.bincount(cols[fit:]).max() / len(cols[fit:])),
        },
        "cell": [probes(features["cell"][:, layer]) for layer in range(features["cell"].shape[1])],
        "answer": [probes(features["answer"][:, layer]) for layer in range(features["answer"].shape[1])],
        "last_layer_heads": [
            probes(features["heads"][:, h : h + head_dim])
            for h in range(0, features["heads"].shape[1], head_dim)
        ],
        "tied_embeddings": backbone.vlm.get_output_embeddings().weight.data_ptr()
        == backbone.vlm.get_input_embeddings().weight.data_ptr(),
        "column_word_cosine": word_similarity(backbone, [" " + c for c in COLUMNS]),
        "row_word_cosine": word_similarity(backbone, [" " + r for r in ROWS]),
    }
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(result: dict) -> None:
    answers, majority = result["answers"], result["majority"]
    print(
        f"where-questions on {result['scenes']} scenes: row {answers['row']:.3f}, column {answers['column']:.3f} "
        f"(single-object scenes {answers['single_object_row']} / {answers['single_object_column']}); "
        f"probe majority baselines {majority['row']:.2f} / {majority['column']:.2f}"
    )
    print("probe accuracy, row / column:")
    for name in ("cell", "answer"):
        cells = [f"{p['row']:.2f}/{p['column']:.2f}" for p in result[name]]
        print(
            f"  {name:7s} embeddings {cells[0]}  "
            + "  ".join(f"L{i} {c}" for i, c in enumerate(cells[1:], 1))
        )
    heads = [f"h{i} {p['row']:.2f}/{p['column']:.2f}" for i, p in enumerate(result["last_layer_heads"])]
    print("  last-layer heads at the answer position: " + "  ".join(heads))
    for kind, words in (("column", COLUMNS), ("row", ROWS)):
        sims = result[f"{kind}_word_cosine"]
        pairs = [f"{words[i]}~{words[j]} {sims[i][j]:.2f}" for i in range(3) for j in range(i + 1, 3)]
        print(
            f"output-embedding cosine of the {kind} words (tied: {result['tied_embeddings']}): "
            + ", ".join(pairs)
        )


if __name__ == "__main__":
    main()
