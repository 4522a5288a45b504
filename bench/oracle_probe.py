"""A model saved by `bench/oracle_tokens.py --save`: does it name a shape's colour after "The <shape> is"?

    .venv/bin/python bench/oracle_probe.py runs/s44/oracle_ss [--scenes 150]

On fresh scenes (ShapesVQA's generator, image indices from 10,000) with a shape seen once, it teacher-forces the
scene's long caption followed by "The <shape> is" and reads the greedy next word, then asks "what colour is the
<shape>?"; it prints how often each names the shape's colour. The oracle tokens stand in for the vision tower,
as in training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from blip3o.eval.vqa import vqa_scene
from blip3o.models.backbone import Backbone
from blip3o.train.data import LONG_CAPTION_PROMPT
from blip3o.world.language import annotate
from blip3o.world.render import render
from oracle_tokens import (  # bench/ is on sys.path when this script runs
    OracleTokens,
    shape_sentences,
    use_oracle_tokens,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", type=Path, help="an --out folder of oracle_tokens.py --save")
    parser.add_argument("--scenes", type=int, default=150)
    args = parser.parse_args(argv)
    backbone = Backbone.from_pretrained(args.saved / "backbone").eval()
    oracle = OracleTokens(backbone.config.hidden_size)
    oracle.load_state_dict(load_file(args.saved / "oracle.safetensors"))
    state: dict = {"scenes": None}
    use_oracle_tokens(backbone, oracle, state)
    tokenizer = backbone.processor.tokenizer
    caption_right = question_right = asked = 0
    for index in range(args.scenes):
        scene = vqa_scene(10_000 + index)
        rng = np.random.default_rng(index)
        caption = annotate(scene, rng).long_caption
        sentences = shape_sentences(scene, rng)
        if not sentences:
            continue
        _, shape, _, colour = sentences.split(".")[0].split()  # "The star is blue"
        state["scenes"] = [scene]
        image = render(scene)
        batch = backbone.understanding_inputs([image], [LONG_CAPTION_PROMPT], [f"{caption} The {shape} is"])
        batch.pop("labels")
        with torch.no_grad():
            logits = backbone.vlm(**batch).logits  # (1, T, V)
        # The sequence ends "... is <|im_end|>": the logits at "is" (second to last) predict the colour.
        caption_right += tokenizer.decode([int(logits[0, -2].argmax())]).strip() == colour
        question_right += (
            backbone.understand([image], [f"what colour is the {shape}?"], 4)[0].strip() == colour
        )
        asked += 1
    print(f"{asked} scenes: 'The <shape> is' -> its colour {caption_right}/{asked}; "
          f"'what colour is the <shape>?' {question_right}/{asked}")  # fmt: skip


if __name__ == "__main__":
    main()
