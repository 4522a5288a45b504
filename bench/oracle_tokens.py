"""Can the miniature's language model learn ShapesVQA at all when its vision tokens are perfect?

    .venv/bin/python bench/oracle_tokens.py runs/x/vision/model runs/x/data --steps 6000 --out runs/oracle
    ... --qa-share 1.0          # questions only, no captions
    ... --qa-turns 8            # conversations of up to 8 of an image's questions
    ... --tower                 # control: the same loop on the tower's own tokens
    ... --shape-sentences       # long captions end in "The star is blue." for each shape seen once
    ... --location-questions    # "where is the red circle?" -> "top left" joins each image's questions
    ... --relation-steps        # relation answers spelled out: "red circle top left, blue star middle
                                # right, so yes" (scored on the word after the last "so")
    ... --relation-holds        # ... and the relations that hold: "..., red circle left of blue star, so yes"
    ... --relation-truth        # ... and the one that holds on the asked axis ("level with" where none does)
    ... --relation-truth --relation-compare  # ... and the asked relation again: "..., asked left of, so no"
    ... --relation-truth --relation-canonical  # "A below B?" asked as "B above A?": "B ..., A ..., B below A, so no"
    ... --axis-questions        # plain answers, with each relation question's twin "is the red circle left or
                                # right of the blue star?" -> "left" joining the image's questions
    ... --colour-steps          # "what colour is the star?" -> "star top left, so blue"
    ... --object-thirds         # each oracle object also carries the third (row, column) it lies in
    ... --tower --cell-embeddings  # the tower's tokens plus the oracle's learned row and column embeddings
    ... --tower --train-merger  # the tower's tokens, its patch merger (the last MLP) trained with the language model
    ... --tower --token-adapter # the tower's tokens plus a learned linear map of them (zero at the start)
    ... --only-relations        # train on relation questions alone (and their twins with --axis-questions)
    ... --relation-share 0.3    # each sample is, with this chance, a relation-only one (its relation questions and
                                # twins) from an image that has them; the rest as usual
    ... --fixed-table           # perfect tokens that do not learn: the fixed target a vision stage with
                                # StageConfig.scene_embedding_weight regresses (scene_supervision.SceneEmbeddingTable)
    ... --fixed-table --tower-share 0.5  # each training image reads the tower's own tokens with this chance
    ... --fixed-table --eval-tower       # evaluations read the tower's own tokens (what a trained model sees)
    ... --vision-from runs/y/vision/model  # the vision tower of another model (e.g. a LM trained on the table,
                                # then read through a trained tower)
    ... --steps 0               # no training: evaluate MODEL as it is (on the full set)

Stage 1's data and most of its recipe (batch 16, lr 1e-3 with 200 warm-up steps and cosine decay, AdamW, grad
clip 1, 80% questions / 20% captions, one question per sample) train the language model of MODEL (a
vision-stage export: its language model is still fresh) on the run's shards, but the merged vision tokens are
replaced by oracle tokens: for each of the 4x4 cells, learned embeddings of its row and its column, plus the
shape and colour of every object whose box centre lies in the cell (an "empty" embedding where none does).
Everything the questions need is then in the tokens, linearly and strongly (RMS 1 per embedding). ShapesVQA
(the same 2,100 questions, greedy) is scored every `--eval-every` steps on a subset and on the full set at the
end (runs/.../log.jsonl). Unlike the recipe: rows are drawn at random (not in epoch order), AdamW has torch's
default betas (0.9, 0.999; the recipe's build_optimizer: 0.9, 0.95) and the cosine decays to 0 (the recipe: to
0.1 x lr). So compare arms of this script with each other, the recipe's runs only as context.

If relations stay at chance here, the language model or its training is what blocks them, not the vision
tokens; if they are learned, the tower's tokens are (docs/bench/understanding_position_trials.txt).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blip3o.eval.vqa import score_answers, vqa_images, vqa_scene, vqa_set
from blip3o.models.backbone import Backbone
from blip3o.models.blip3o import Blip3o
from blip3o.train.data import LONG_CAPTION_PROMPT, Example, load_shards, make_batch
from blip3o.train.scene_supervision import SceneEmbeddingTable, replace_merged_tokens
from blip3o.world.language import (
    COLUMNS,
    ROWS,
    color_question_shape,
    location_questions,
    object_location,
)
from blip3o.world.reasoning import ANSWER_MARKER, final_answer, relation_questions, relation_steps
from blip3o.world.render import render
from blip3o.world.scene import COLORS, SHAPES, Scene

GRID = 4  # merged tokens per side (64 px images, patch 8, merge 2)
CELL = 16  # pixels per merged token
COLOUR_NAMES = list(COLORS)


class OracleTokens(nn.Module):
    """(B * 16, H) ideal vision tokens of scenes, in the merged grid's raster order."""

    def __init__(self, hidden: int, thirds: bool = False) -> None:
        super().__init__()
        self.row = nn.Parameter(torch.randn(GRID, hidden))
        self.col = nn.Parameter(torch.randn(GRID, hidden))
        self.shape = nn.Parameter(torch.randn(len(SHAPES), hidden))
        self.colour = nn.Parameter(torch.randn(len(COLORS), hidden))
        self.empty = nn.Parameter(torch.randn(hidden))
        # Optional: each object also carries the third of the canvas (row, column) its box centre lies in, the
        # grid the captions and where-answers use, which the 4x4 cells do not resolve (16 px vs 21.3 px).
        self.third_row = nn.Parameter(torch.randn(3, hidden)) if thirds else None
        self.third_col = nn.Parameter(torch.randn(3, hidden)) if thirds else None

    def cells(self) -> torch.Tensor:
        """(16, H): each merged cell's row embedding plus its column embedding, in raster order."""
        rows = torch.arange(GRID, device=self.row.device).repeat_interleave(GRID)  # (16,)
        cols = torch.arange(GRID, device=self.row.device).repeat(GRID)  # (16,)
        return self.row[rows] + self.col[cols]

    def forward(self, scenes: list[Scene]) -> torch.Tensor:
        cells = self.cells()  # (16, H), the same for every scene
        out = []
        for scene in scenes:
            content = [self.empty] * (GRID * GRID)
            for obj in scene.objects:
                cx, cy = obj.center
                index = min(int(cy // CELL), GRID - 1) * GRID + min(int(cx // CELL), GRID - 1)
                piece = self.shape[SHAPES.index(obj.shape)] + self.colour[COLOUR_NAMES.index(obj.color)]
                if self.third_row is not None:
                    row, col = object_location(obj, scene.size)
                    piece = piece + self.third_row[ROWS.index(row)] + self.third_col[COLUMNS.index(col)]
                content[index] = piece if content[index] is self.empty else content[index] + piece
            out.append(cells + torch.stack(content))  # (16, H)
        return torch.cat(out)  # (B * 16, H)


def use_oracle_tokens(backbone, oracle, state: dict) -> None:
    """Make the backbone's vision tower return `oracle(state["scenes"])` ((B * 16, H): an `OracleTokens` or any
    function of the scenes) in place of its merged tokens; set
    state["scenes"] to the scenes of the images before each forward."""

    def replace_tokens(module, inputs, kwargs, output):
        tokens = oracle(state["scenes"])  # (B * 16, H)
        if tokens.shape != output.pooler_output.shape:
            raise RuntimeError(
                f"oracle tokens {tuple(tokens.shape)} vs tower {tuple(output.pooler_output.shape)}"
            )
        output.pooler_output = tokens.to(output.pooler_output.dtype)
        return output

    backbone.vision_tower.register_forward_hook(replace_tokens, with_kwargs=True)


def use_table_or_tower(backbone, table: SceneEmbeddingTable, state: dict) -> None:
    """Make the backbone's vision tower return the fixed table's target of state["scenes"], except for the images
    where state["tower"] (one bool per image, or one for all) is true: those keep the tower's own tokens. How a language model
    trained on the target reads a trained tower's approximation of it, and whether mixing the two teaches it."""

    def replace_tokens(module, inputs, kwargs, output):
        scenes = state["scenes"]
        tower = [state["tower"]] * len(scenes) if isinstance(state["tower"], bool) else state["tower"]
        on_table = ~torch.tensor(tower, dtype=torch.bool)  # (B,)
        target = table.targets(scenes, GRID)  # (B, 16, H)
        output.pooler_output = replace_merged_tokens(output.pooler_output, target, on_table)  # (B * 16, H)
        return output

    backbone.vision_tower.register_forward_hook(replace_tokens, with_kwargs=True)


def add_to_tokens(backbone, extra) -> None:
    """Add `extra(tokens)` ((B * 16, H) -> (B * 16, H)) to the tower's merged tokens on every forward."""

    def add(module, inputs, kwargs, output):
        tokens = output.pooler_output  # (B * 16, H)
        output.pooler_output = tokens + extra(tokens).to(tokens.dtype)
        return output

    backbone.vision_tower.register_forward_hook(add, with_kwargs=True)


def add_cell_embeddings(backbone, oracle: OracleTokens) -> None:
    """Add the oracle's learned row and column embeddings of each merged cell to the tower's own tokens: where a
    token is, as strongly and linearly as the oracle gives it, with the tower's content left as it is."""
    add_to_tokens(backbone, lambda tokens: oracle.cells().repeat(tokens.shape[0] // (GRID * GRID), 1))


def add_token_adapter(backbone, adapter: nn.Linear) -> None:
    """Add `adapter(tokens)` to the tower's merged tokens: with a zero-initialised adapter the tokens start as the
    tower made them and may move towards what the language model reads best, as the oracle's learned embeddings
    do, while the frozen tower keeps its content."""
    add_to_tokens(backbone, lambda tokens: adapter(tokens.float()))


def shape_sentences(scene: Scene, rng: np.random.Generator) -> str:
    """Caption text for every shape the scene holds once (" The star is blue."), in a random order: text that
    starts a lookup from a shape alone, which ShapesWorld's captions never do."""
    shapes = [o.shape for o in scene.objects]
    unique = [o for o in scene.objects if shapes.count(o.shape) == 1]
    return "".join(f" The {unique[i].shape} is {unique[i].color}." for i in rng.permutation(len(unique)))


def colour_steps(question: str, answer: str, scene: Scene) -> str:
    """A colour-of-a-shape answer through the shape's place: "what colour is the star?" -> "star top left, so
    blue". The first step is a lookup by shape (as counting a shape is), the second one by place (as every
    caption's "In the top left, there is a blue star" is). Other questions keep their answer."""
    shape = color_question_shape(question)
    if shape is None:
        return answer
    obj = next(o for o in scene.objects if o.shape == shape)
    return f"{shape} {' '.join(object_location(obj, scene.size))}{ANSWER_MARKER}{answer}"


def where_accuracy(backbone, hook_state: dict, n_images: int = 150, batch: int = 64) -> dict[str, float]:
    """Where-questions ("where is the red circle?" -> "top left", `location_questions`) on the first `n_images`
    ShapesVQA images: the share answered right in both words, in the row word and in the column word. Not a
    ShapesVQA kind, but the plainest test of whether the language model reads an object's place from the tokens
    (an arm trained with --location-questions has practised it)."""
    scenes = [vqa_scene(i) for i in range(n_images)]
    images = [render(scene) for scene in scenes]  # each image once, whatever its number of questions
    rows = [
        (scene, image, qa)
        for scene, image in zip(scenes, images, strict=True)
        for qa in location_questions(scene)
    ]
    both = row = column = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        hook_state["scenes"] = [scene for scene, _, _ in chunk]
        replies = backbone.understand(
            [image for _, image, _ in chunk], [qa.question for _, _, qa in chunk], 8
        )
        for (_, _, qa), reply in zip(chunk, replies, strict=True):
            said, truth = reply.split()[:2], qa.answer.split()
            both += said == truth
            row += said[:1] == truth[:1]
            column += said[1:] == truth[1:]
    return {
        "both": both / len(rows),
        "row": row / len(rows),
        "column": column / len(rows),
        "questions": len(rows),
    }


def answer_all(backbone, hook_state: dict, items, batch: int = 64, max_new_tokens: int = 8) -> dict[str, str]:
    images = vqa_images(items)
    answers = {}
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        hook_state["scenes"] = [vqa_scene(it.image_index, it.seed) for it in chunk]
        replies = backbone.understand(
            [images[it.image_index] for it in chunk], [it.question for it in chunk], max_new_tokens
        )
        answers.update({it.id: r for it, r in zip(chunk, replies, strict=True)})
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", type=Path, help="a vision-stage export or its backbone/ (fresh language model)"
    )
    parser.add_argument("data", type=Path, help="the run's shard folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--eval-subset", type=int, default=700, help="questions per intermediate evaluation")
    parser.add_argument(
        "--qa-share", type=float, default=0.8, help="share of question samples (rest: captions)"
    )
    parser.add_argument("--qa-turns", type=int, default=1, help="questions per question sample")
    parser.add_argument(
        "--average", choices=("token", "sample"), default="token", help="understanding loss average"
    )
    parser.add_argument("--shape-sentences", action="store_true", help="long captions end in shape_sentences")
    parser.add_argument(
        "--location-questions", action="store_true", help="add where-questions to each image's questions"
    )
    parser.add_argument(
        "--axis-questions", action="store_true", help="add the axis twin of each relation question"
    )
    parser.add_argument(
        "--relation-steps", action="store_true", help="train relation answers spelled out (relation_steps)"
    )
    parser.add_argument(
        "--relation-holds", action="store_true", help="relation steps also list the relations that hold"
    )
    parser.add_argument(
        "--relation-truth",
        action="store_true",
        help="relation steps also name the relation on the asked axis",
    )
    parser.add_argument(
        "--relation-compare",
        action="store_true",
        help="with --relation-truth: write the asked relation again just before the answer",
    )
    parser.add_argument(
        "--relation-canonical",
        action="store_true",
        help='with --relation-truth: ask "A below B" as "B above A" (the answer follows from the written relation)',
    )
    parser.add_argument(
        "--object-thirds", action="store_true", help="oracle objects also carry the third they lie in"
    )
    parser.add_argument(
        "--colour-steps",
        action="store_true",
        help="train colour-of-a-shape answers spelled out (colour_steps)",
    )
    parser.add_argument(
        "--save", action="store_true", help="write OUT/backbone and OUT/oracle.safetensors at the end"
    )
    parser.add_argument("--tower", action="store_true", help="control: keep the vision tower's own tokens")
    parser.add_argument(
        "--cell-embeddings", action="store_true", help="with --tower: add learned row / column embeddings"
    )
    parser.add_argument(
        "--train-merger",
        action="store_true",
        help="with --tower: train the tower's patch merger with the language model (the rest stays frozen)",
    )
    parser.add_argument(
        "--token-adapter",
        action="store_true",
        help="with --tower: add a learned, zero-initialised linear map of the tokens to them",
    )
    parser.add_argument(
        "--fixed-table",
        action="store_true",
        help="perfect tokens from the fixed SceneEmbeddingTable (not learned): a scene-embedding tower's target",
    )
    parser.add_argument(
        "--only-relations",
        action="store_true",
        help="questions: relation ones only (and their axis twins), from the images that have one",
    )
    parser.add_argument(
        "--relation-share",
        type=float,
        default=0.0,
        help="chance that a sample is a relation-only one (as --only-relations) instead of the usual mix",
    )
    parser.add_argument(
        "--tower-share",
        type=float,
        default=0.0,
        help="with --fixed-table: chance that a training image reads the tower's own tokens instead",
    )
    parser.add_argument(
        "--eval-tower",
        action="store_true",
        help="with --fixed-table: evaluations read the tower's own tokens",
    )
    parser.add_argument(
        "--vision-from",
        type=Path,
        help="a model folder (or backbone folder) whose vision tower replaces MODEL's",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.cell_embeddings and not args.tower:
        parser.error("--cell-embeddings adds to the tower's tokens: give --tower too")
    if args.token_adapter and not args.tower:
        parser.error("--token-adapter adapts the tower's tokens: give --tower too")
    if args.train_merger and not args.tower:
        parser.error("--train-merger trains the tower's own merger: give --tower too")
    if not 0.0 <= args.relation_share <= 1.0:
        parser.error(f"--relation-share is a chance in [0, 1], got {args.relation_share}")
    if args.relation_share and args.only_relations:
        parser.error("--only-relations already makes every sample a relation-only one")
    if args.fixed_table and (args.tower or args.object_thirds):
        parser.error("--fixed-table replaces the tower's tokens and always carries the thirds")
    if (args.tower_share or args.eval_tower) and not args.fixed_table:
        parser.error(
            "--tower-share and --eval-tower mix the fixed table with the tower: give --fixed-table too"
        )
    if not 0.0 <= args.tower_share <= 1.0:
        parser.error(f"--tower-share is a chance in [0, 1], got {args.tower_share}")
    if args.steps < 0:
        parser.error(f"--steps must be >= 0 (0: evaluate only), got {args.steps}")
    if args.relation_canonical and (not args.relation_truth or args.relation_compare or args.relation_holds):
        parser.error("--relation-canonical is a form of the truth step alone: give --relation-truth only")
    if args.relation_compare and not args.relation_truth:
        parser.error(
            "--relation-compare writes the asked relation beside the one that holds: give --relation-truth"
        )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    backbone = load_backbone(args.model)
    if args.vision_from:
        backbone.vision_tower.load_state_dict(load_backbone(args.vision_from).vision_tower.state_dict())
    hidden = backbone.config.hidden_size
    backbone.to(args.device)
    oracle = OracleTokens(hidden, thirds=args.object_thirds).to(args.device)
    hook_state: dict = {"scenes": None, "tower": False}

    extra: list = []  # what trains besides the language model, set beside the hook that uses it
    if args.fixed_table:
        table = SceneEmbeddingTable(hidden, GRID).to(args.device)
        use_table_or_tower(backbone, table, hook_state)
    elif not args.tower:
        use_oracle_tokens(backbone, oracle, hook_state)
        extra += list(oracle.parameters())
    elif args.cell_embeddings:
        add_cell_embeddings(backbone, oracle)
        extra += [oracle.row, oracle.col]
    if args.token_adapter:  # built only when asked: its init draws from torch's generator
        adapter = nn.Linear(hidden, hidden).to(args.device)
        nn.init.zeros_(adapter.weight)
        nn.init.zeros_(adapter.bias)
        add_token_adapter(backbone, adapter)
        extra += list(adapter.parameters())
    backbone.requires_grad_(False)
    backbone.vlm.requires_grad_(True)
    backbone.vision_tower.requires_grad_(False)
    if args.train_merger:
        # The merged tokens may then move towards what the language model reads best, as the oracle's learned
        # embeddings do, while the tower below keeps what its vision stage taught it.
        backbone.vision_tower.merger.requires_grad_(True)
    params = [p for p in backbone.parameters() if p.requires_grad] + extra
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    spelled_relations = args.relation_steps or args.relation_holds or args.relation_truth
    spelled = spelled_relations or args.colour_steps  # answers end "so <word>"
    examples, _ = load_shards(args.data)
    if args.only_relations:
        examples = relation_examples(examples)
        print(f"--only-relations: {len(examples)} images with relation questions", flush=True)
    n_usual = len(examples)
    if args.relation_share:  # the relation-only copies follow the usual examples; rows past n_usual draw them
        examples = examples + relation_examples(examples)
    items = vqa_set()
    subset = [items[i] for i in np.random.default_rng(0).permutation(len(items))[: args.eval_subset]]
    rng = np.random.default_rng(args.seed)
    tower_rng = np.random.default_rng([args.seed, 23])  # its own stream: a share of 0 draws as before
    log_path = args.out / "log.jsonl"
    log_path.write_text("")
    losses, start = [], time.time()

    def evaluate(step: int, final: bool) -> None:
        backbone.eval()
        hook_state["tower"] = args.eval_tower
        scored = items if final else subset
        replies = answer_all(backbone, hook_state, scored, max_new_tokens=40 if spelled else 8)
        if final:  # every reply as the model wrote it, steps included, for reading its errors
            with open(args.out / "replies.jsonl", "w") as out:
                for it in scored:
                    out.write(json.dumps({**it.to_dict(), "reply": replies[it.id]}) + "\n")
        if spelled:
            replies = {key: final_answer(reply) for key, reply in replies.items()}
        scores = score_answers(scored, replies)
        recent = losses[-args.eval_every :]
        record = {"step": step, "loss": float(np.mean(recent)) if recent else None, "questions": len(scored),
                  "overall": scores["overall"], "per_kind": scores["per_kind"],
                  "minutes": (time.time() - start) / 60}  # fmt: skip
        if final:
            record["where"] = where_accuracy(backbone, hook_state)
            print(f"where-questions: {record['where']}", flush=True)
        with open(log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        kinds = " ".join(f"{k} {v:.3f}" for k, v in scores["per_kind"].items())
        loss_text = f"{record['loss']:.4f}" if recent else "-"
        print(
            f"step {step}: loss {loss_text} | VQA ({len(scored)}) {scores['overall']:.3f} | {kinds}",
            flush=True,
        )

    for step in range(1, args.steps + 1):
        backbone.train()
        rows = draw_rows(rng, n_usual, len(examples), args.batch, args.relation_share)
        batch = make_batch("understanding", examples, rows, [step * args.batch + i for i in range(args.batch)],
                           args.seed, 0.5, qa_share=args.qa_share, qa_turns=args.qa_turns,
                           location_questions=args.location_questions,
                           axis_questions=args.axis_questions)  # fmt: skip
        hook_state["scenes"] = [examples[r].scene for r in rows]
        hook_state["tower"] = (
            (tower_rng.random(args.batch) < args.tower_share).tolist() if args.tower_share else False
        )
        if spelled_relations:
            rewrite = functools.partial(
                relation_steps,
                holds=args.relation_holds,
                truth=args.relation_truth,
                compare=args.relation_compare,
            )
            spell_out(batch, hook_state["scenes"], rewrite)
        if args.colour_steps:
            spell_out(batch, hook_state["scenes"], colour_steps)
        if args.shape_sentences:
            for i, scene in enumerate(hook_state["scenes"]):
                if batch["prompts"][i] == LONG_CAPTION_PROMPT:
                    batch["answers"][i] += shape_sentences(scene, np.random.default_rng([args.seed, step, i]))
        loss = backbone.understanding_loss(batch["images"], batch["prompts"], batch["answers"], args.average)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 and step != args.steps:
            evaluate(step, final=False)
    evaluate(args.steps, final=True)
    if args.save:
        save(backbone, oracle, args.out)


def load_backbone(path: Path) -> Backbone:
    """The backbone of a model folder, or a backbone folder."""
    if (path / "backbone").is_dir():
        # A whole model folder loads as a whole, as before session 46: building its other components draws from
        # torch's generator, so the oracle's embeddings start where the earlier arms' did.
        return Blip3o.from_pretrained(path).backbone
    return Backbone.from_pretrained(path)


def relation_examples(examples: list[Example]) -> list[Example]:
    """The examples that have relation questions, each with those alone: the relation is then all a question
    sample trains (with --axis-questions, beside its first-order twin), not one kind in seven."""
    kept = [(ex, relation_questions(ex.qa)) for ex in examples]
    return [dataclasses.replace(ex, qa=qa) for ex, qa in kept if qa]


def draw_rows(
    rng: np.random.Generator, n_usual: int, n_all: int, batch: int, relation_share: float
) -> list[int]:
    """`batch` rows of the examples: each, with chance `relation_share`, one of the relation-only copies (rows
    n_usual .. n_all - 1), else a usual one. A share of 0 draws exactly what the script drew before it had one."""
    rows = rng.integers(n_usual, size=batch).tolist()
    if relation_share:
        relation_rows = rng.integers(n_usual, n_all, size=batch).tolist()
        chosen = rng.random(batch) < relation_share
        rows = [r if c else u for u, r, c in zip(rows, relation_rows, chosen, strict=True)]
    return rows


def spell_out(batch: dict, scenes: list[Scene], rewrite) -> None:
    """Rewrite, in place, every answer of an understanding batch (single questions or conversations) with
    `rewrite(question, answer, scene)` (`relation_steps`, `colour_steps`)."""
    for i, scene in enumerate(scenes):
        prompt, answer = batch["prompts"][i], batch["answers"][i]
        if isinstance(prompt, str):
            batch["answers"][i] = rewrite(prompt, answer, scene)
        else:
            batch["answers"][i] = [rewrite(q, a, scene) for q, a in zip(prompt, answer, strict=True)]


def save(backbone, oracle: OracleTokens, out: Path) -> None:
    """The trained language model (HF layout) and the oracle embeddings, for probes run later."""
    from safetensors.torch import save_file

    backbone.save_pretrained(out / "backbone")
    save_file(
        {k: v.detach().contiguous() for k, v in oracle.state_dict().items()}, out / "oracle.safetensors"
    )


if __name__ == "__main__":
    main()
