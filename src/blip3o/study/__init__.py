"""The paper's design study on ShapesWorld: generation designs trained on equal terms, measured, reported."""
