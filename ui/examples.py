"""Example prompts, as data: the paper's figures and the authors' released demos (prompt, seed)."""

EXAMPLES: list[tuple[str, int]] = [
    ("A green banana and a brown horse.", 0),  # paper figure
    ("A robot penguin wearing a top hat and playing a vintage trumpet under a rainbow.", 306),  # SDXL demo
    ("Photograph of a wall along a city street with a watercolor mural of foxes in a jazz band.", 305),  # SDXL demo
    ("One morning I chased an elephant in my pajamas", 100),  # FLUX demo
    ("a woman on the top of a butterfly", 2),  # FLUX demo
    ("a rubber ball and a metallic car", 2),  # FLUX demo
]
