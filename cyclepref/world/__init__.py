"""The sandbox world: synthetic scenes of coloured shapes with known ground truth (PAPER.md's method, measurable).

scene.py  the seeded scene generator, the renderer and the world's captions (what the world models learn from).
parse.py  parsers of captions and images back into objects, and attribute-level F1 (the ground-truth judges).
"""
