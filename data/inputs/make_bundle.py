"""Rebuild the bundled input set from the sample photographs shipped inside scikit-image and scikit-learn.

Run once by hand (needs scikit-image and scikit-learn installed); the outputs are tracked in git.
    python data/inputs/make_bundle.py
"""

import json
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
MAX_SIDE = 256

# file stem, package, file, licence, source, human caption, prompt
ITEMS = [
    ("astronaut", "skimage", "astronaut.png", "Public domain (NASA)", "NASA Great Images database",
     "A smiling astronaut with short curly brown hair poses in an orange launch suit with mission patches, holding a "
     "white helmet with a dark visor; an American flag hangs on the left and a model of the space shuttle stands "
     "behind her on the right.",
     "a smiling astronaut in an orange space suit holding a helmet in front of an American flag"),
    ("camera", "skimage", "camera.png", "CC0 (Lav Varshney)", "scikit-image sample data",
     "A black-and-white photo of a man in a dark coat bending to look through a video camera mounted on a tripod on "
     "a wide lawn, with buildings and a tall tower far in the background.",
     "a black and white photo of a man filming with a camera on a tripod in a field"),
    ("chelsea", "skimage", "chelsea.png", "CC0 (Stefan van der Walt)", "scikit-image sample data",
     "A close-up of a tabby cat's face with striped orange and brown fur, large green-yellow eyes, a pink nose and "
     "long white whiskers, against a blurred pale background.",
     "a close-up of a tabby cat with green eyes"),
    ("coffee", "skimage", "coffee.png", "CC0 (Rachel Michetti)", "scikit-image sample data",
     "An espresso in a white cup with a red outside, on a red saucer with a silver spoon, seen from above on a "
     "warm brown wooden table.",
     "a cup of espresso on a red saucer with a spoon on a wooden table"),
    ("coins", "skimage", "coins.png", "No known copyright restrictions (Brooklyn Museum)", "scikit-image sample data",
     "A grayscale photograph of twenty-four ancient Greek coins from Pompeii laid out in four rows on a dark "
     "background, each showing a worn relief of a head or a figure.",
     "rows of ancient silver coins on a dark background, black and white"),
    ("brick", "skimage", "brick.png", "CC0 (CC0Textures)", "scikit-image sample data",
     "A grayscale texture of a brick pavement seen at an angle: long narrow bricks laid in a running bond, separated "
     "by light mortar lines that converge towards the top.",
     "a brick pavement in perspective, grayscale texture"),
    ("grass", "skimage", "grass.png", "CC0 (DeviantArt, linolafett)", "scikit-image sample data",
     "A grayscale close-up texture of dense, short grass blades and small leaves covering the whole frame.",
     "a dense patch of grass seen from above, black and white"),
    ("gravel", "skimage", "gravel.png", "CC0 (CC0Textures)", "scikit-image sample data",
     "A grayscale texture of small angular gravel stones packed tightly together, evenly lit from above.",
     "a close-up of gray gravel stones"),
    ("hubble_deep_field", "skimage", "hubble_deep_field.jpg", "Public domain (NASA)", "HubbleSite",
     "The Hubble eXtreme Deep Field: a black sky scattered with hundreds of small distant galaxies in red, orange, "
     "white and blue, some spiral and some elliptical.",
     "a deep space photo full of colorful distant galaxies on a black sky"),
    ("ihc", "skimage", "ihc.png", "No known copyright restrictions (CMMI)", "scikit-image sample data",
     "A microscope image of colon tissue with immunohistochemical staining: brown-stained glands with radiating "
     "cells surrounded by pale tissue with small blue-purple nuclei.",
     "a microscope image of stained tissue with brown glands and blue nuclei"),
    ("retina", "skimage", "retina.jpg", "CC0 (Mikael Haggstrom, Wikimedia Commons)", "Wikimedia Commons",
     "A fundus photograph of a healthy human retina: an orange-red disc on a black background with the bright "
     "yellow optic disc on the left and dark red blood vessels branching across it.",
     "a fundus photograph of a human retina with red blood vessels"),
    ("rocket", "skimage", "rocket.jpg", "Public domain (SpaceX)", "SpaceX Photos",
     "A Falcon 9 rocket standing upright on its launch pad at dusk, lit by bright lights, between tall lattice "
     "lightning towers under a deep blue sky.",
     "a white rocket on a launch pad at dusk between lightning towers"),
    ("text", "skimage", "text.png", "Public domain (Wikipedia)", "Wikipedia, File:Corner.png",
     "A grayscale photo of handwritten mathematical notes on paper, shot at a slant, with formulas and symbols "
     "written in dark ink.",
     "handwritten math formulas on a sheet of paper, black and white"),
    ("cell", "skimage", "cell.png", "CC0", "scikit-image sample data (qpformat)",
     "A grayscale quantitative phase image of a single round cell floating in saline: a small bright disc "
     "in the lower right on a smooth gray background.",
     "a single bright round cell on a gray background, microscope image"),
    ("china", "sklearn", "china.jpg", "CC BY 2.0 (danielbuechele on Flickr)", "scikit-learn sample images",
     "A tall Chinese pagoda with several tiers of red, green and gold painted eaves rises above green trees, with "
     "a lake and a hazy shore behind it under a pale sky.",
     "a colorful Chinese pagoda above trees next to a lake"),
    ("flower", "sklearn", "flower.jpg", "CC BY 2.0 (vultilion on Flickr)", "scikit-learn sample images",
     "An orange dahlia flower in full bloom with tightly packed rounded petals, sharply in focus against a dark "
     "blurred teal-green background, with a second bud at the bottom edge.",
     "an orange dahlia flower on a dark green background"),
]


def package_dir(name: str) -> Path:
    if name == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


def main() -> None:
    out = HERE / "images"
    out.mkdir(exist_ok=True)
    rows, sources = [], []
    for stem, pkg, fname, licence, origin, caption, prompt in ITEMS:
        img = Image.open(package_dir(pkg) / fname).convert("RGB")
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        img.save(out / f"{stem}.jpg", quality=90)
        rows.append({"file": f"images/{stem}.jpg", "prompt": prompt, "caption": caption})
        sources.append(f"| {stem}.jpg | {pkg} `{fname}` | {origin} | {licence} |")
    (HERE / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (HERE / "SOURCES.md").write_text(
        "# Bundled inputs\n\nDownscaled (longest side 256 px, JPEG q90) copies of sample photographs shipped inside "
        "scikit-image and scikit-learn, made by `make_bundle.py`. Captions and prompts in `texts.jsonl` were written "
        "by hand for this project (CC0).\n\n| file | from | original source | licence |\n|---|---|---|---|\n"
        + "\n".join(sources) + "\n"
    )


if __name__ == "__main__":
    main()
